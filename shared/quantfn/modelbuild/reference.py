"""The fp32 reference: sentence-transformers embeddings of the fidelity corpus.

Run once by a maintainer (``python -m quantfn.modelbuild.reference``); the result is
committed as ``data/reference_fp32.npy`` so builds never need torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_PATH = DATA_DIR / "fidelity_corpus.txt"
REFERENCE_PATH = DATA_DIR / "reference_fp32.npy"


def load_corpus(path: Path = CORPUS_PATH) -> list[str]:
    """The corpus sentences, one per non-empty line, in file order."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_reference(path: Path = REFERENCE_PATH) -> np.ndarray:
    """Stored reference embeddings, float32 [sentences, 384], L2-normalised."""
    return np.load(path)


def write_reference(path: Path = REFERENCE_PATH) -> np.ndarray:
    """Embed the corpus with sentence-transformers in fp32 and save it. Needs torch."""
    import torch
    from sentence_transformers import SentenceTransformer

    from quantfn.modelbuild.source import locate_source

    torch.set_num_threads(2)
    model = SentenceTransformer(str(locate_source().folder), device="cpu")
    # The upstream model truncates at 256 word pieces; so does our runtime.
    model.max_seq_length = 256
    vectors = model.encode(load_corpus(), batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    np.save(path, vectors)
    return vectors


if __name__ == "__main__":
    print(write_reference().shape)
