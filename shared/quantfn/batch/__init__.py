"""Batch jobs: JSON Lines in S3 (or a few inline texts) -> embeddings in S3, in checkpointed chunks."""
