"""Model references, manifests, the verified store and inference sessions."""
