"""The int8/uint8 ranges of an embedder's output, calibrated at build time and stored in its manifest.

int8 and uint8 embeddings (``quantfn.tasks.embed.typed_embeddings``) scale each dimension by a range
(low, high) the model's manifest holds, so the same text gives the same codes in every invocation,
batch job and endpoint route. The ranges are the minimum and maximum of each dimension over the
embeddings of the build's calibration texts (the texts the recipe calibrates on, never a benchmark's),
computed by the published model itself through the runtime's pipeline (``quantfn.tasks.open_pipeline``),
once for the model's own size and once for each Matryoshka size (a build option: the vector truncated
and re-normalised, as the runtime serves it). A value outside its range is clipped to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantfn.modelbuild.errors import BuildError

METHOD = "minimum and maximum of each dimension over the calibration texts' embeddings"


def check_sizes(sizes: Sequence[int], dimensions: int) -> tuple[int, ...]:
    """Matryoshka sizes as the manifest keeps them (largest first); BuildError for a size the model cannot give."""
    if any(not 0 < size < dimensions for size in sizes) or len(set(sizes)) != len(sizes):
        raise BuildError(f"Matryoshka dimensions must be distinct sizes below the model's {dimensions}: {list(sizes)}")
    return tuple(sorted(sizes, reverse=True))


def calibrate(folder: Path, texts: Sequence[str], sizes: Sequence[int] = (), threads: int = 2) -> dict[str, Any]:
    """``{"matryoshka_dimensions"?, "embedding_ranges"}`` for the embedder in ``folder``, from ``texts``."""
    import numpy as np

    from quantfn.models.manifest import Manifest
    from quantfn.tasks import EmbedPipeline, open_pipeline
    from quantfn.tasks.embed import matryoshka

    manifest = Manifest.read(folder)
    sizes = check_sizes(sizes, manifest.dimensions)
    pipeline = open_pipeline(folder, manifest, threads)
    assert isinstance(pipeline, EmbedPipeline)
    vectors = pipeline.embed(list(texts))
    by_dimensions = {}
    for size in (manifest.dimensions, *sizes):
        at_size = vectors if size == manifest.dimensions else matryoshka(vectors, size, manifest.normalize)
        low, high = at_size.min(axis=0).astype(np.float64), at_size.max(axis=0).astype(np.float64)
        by_dimensions[str(size)] = {"low": _rounded(low.tolist()), "high": _rounded(high.tolist())}
    digest = hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()
    record = {"method": METHOD, "texts": len(texts), "texts_sha256": digest, "by_dimensions": by_dimensions}
    return ({"matryoshka_dimensions": list(sizes)} if sizes else {}) | {"embedding_ranges": record}


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 7) for value in values]


def add_to_published(folder: Path, texts: Sequence[str], sizes: Sequence[int] = ()) -> dict[str, Any]:
    """Calibrate the published embedder in ``folder`` and write its manifest again with the ranges (one atomic
    replace of ``manifest.json``; its files do not change). Returns the new manifest."""
    from quantfn.models.manifest import MANIFEST_NAME, Manifest

    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8")) | calibrate(folder, texts, sizes)
    Manifest.from_dict(manifest)
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return manifest
