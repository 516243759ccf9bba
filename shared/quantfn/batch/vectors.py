"""Compact outputs of embed jobs: each chunk's vectors as one ``.npy`` file a vector store loads as it is.

A job's ``format`` (``FORMATS``): ``float32`` keeps today's records, the embedding in each JSON line.
The others write, beside ``results/shard-s/part-k.jsonl`` (whose records then hold ``{"id", "line",
"row"}``, ``row`` the record's row in the part's vectors), ``vectors/shard-s/part-k.npy``:

* ``float16``: ``[n, d]`` float16 (half of float32's bytes);
* ``int8``: ``[n, d]`` int8, the codes the API's ``int8`` type gives (the model's calibrated ranges);
* ``ubinary``: ``[n, d / 8]`` uint8, ``packbits(x > 0)`` (FAISS ``IndexBinaryFlat`` takes it as it is).

``vectors/format.json``, written once per job, says the format, the model, the dimensions and, for
int8, the manifest's ranges, to map a code back: ``x ~ low + (code + 128) * (high - low) / 255``.
A part's vectors are written before its results object, which marks the chunk done, so a chunk
redone after a crash writes identical bytes and a reader never finds results without their vectors.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from quantfn.batch import shards as store
from quantfn.batch.jobs import FORMATS, BadJob, JobMessage
from quantfn.batch.records import Problem
from quantfn.models.manifest import Manifest
from quantfn.tasks import TASKS
from quantfn.tasks.embed import typed_embeddings

__all__ = ["FORMATS", "check_format", "format_record", "pack", "write_part"]
_TYPES = {"int8": "int8", "ubinary": "ubinary"}  # the API types the compact formats are


def model_manifest(registry: Any, job: JobMessage) -> Manifest:
    return registry.manifest(registry.resolve(job.model, TASKS[job.task]))


def check_format(registry: Any, job: JobMessage) -> None:
    """BadJob for a format the job cannot have: compact formats are for embed jobs, int8 for models with ranges."""
    if job.format == "float32":
        return
    if job.task != "embed":
        raise BadJob(f"'format' {job.format} is for embed jobs; {job.task} jobs write JSON Lines.", param="format")
    manifest = model_manifest(registry, job)
    if job.format == "int8" and manifest.dimensions not in manifest.embedding_ranges:
        raise BadJob(
            f"'format' int8 needs calibrated ranges, which model {manifest.model_id} was built without: rebuild it "
            "with `quantfn build-model`, or choose float16 or ubinary.",
            param="format",
        )
    if job.format == "ubinary" and manifest.dimensions % 8:
        raise BadJob(f"'format' ubinary needs dimensions divisible by 8, not {manifest.dimensions}.", param="format")


def pack(vectors: np.ndarray, fmt: str, manifest: Manifest) -> np.ndarray:
    """``vectors`` [n, d] float32 in ``fmt``."""
    if fmt == "float16":
        return vectors.astype(np.float16)
    return typed_embeddings(vectors, [_TYPES[fmt]], manifest)[_TYPES[fmt]]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_part(
    registry: Any, s3: Any, job: JobMessage, part: str, outputs: list[dict[str, Any] | Problem]
) -> list[dict[str, Any] | Problem]:
    """For a compact format: write the part's vectors file (and the job's ``format.json``) once, and return the
    outputs with ``row`` in place of ``embedding``. ``float32`` (or no embeddings): ``outputs`` unchanged."""
    if job.format == "float32" or job.task != "embed":
        return outputs
    manifest = model_manifest(registry, job)
    bucket, prefix = job.output.bucket, job.prefix + "vectors/"
    store.put_once(s3, bucket, prefix + "format.json", json.dumps(format_record(job.format, manifest), indent=1))
    rows = [output["embedding"] for output in outputs if isinstance(output, dict)]
    vectors = np.stack(rows).astype(np.float32) if rows else np.empty((0, manifest.dimensions), np.float32)
    store.put_once(
        s3, bucket, prefix + part.removesuffix(".jsonl") + ".npy", npy_bytes(pack(vectors, job.format, manifest))
    )
    compact: list[dict[str, Any] | Problem] = []
    row = 0
    for output in outputs:
        if isinstance(output, dict):
            compact.append({"row": row})
            row += 1
        else:
            compact.append(output)
    return compact


def format_record(fmt: str, manifest: Manifest) -> dict[str, Any]:
    """What a reader needs to load the job's vectors: format, dtype and shape per row, the model, int8's ranges."""
    d = manifest.dimensions
    dtype, width = {"float16": ("float16", d), "int8": ("int8", d), "ubinary": ("uint8", d // 8)}[fmt]
    record: dict[str, Any] = {
        "format": fmt,
        "dtype": dtype,
        "row_shape": [width],
        "dimensions": d,
        "model": {"id": manifest.model_id, "sha256": manifest.files["model.onnx"].sha256},
        "normalized": manifest.normalize,
        "files": "vectors/<shard>/<part>.npy, one row per record of results/<shard>/<part>.jsonl ('row')",
    }
    if fmt == "int8":
        low, high = manifest.embedding_ranges[d]
        record["ranges"] = {"low": list(low), "high": list(high), "decode": "low + (code + 128) * (high - low) / 255"}
    if fmt == "ubinary":
        record["bits"] = "numpy.packbits(x > 0, axis=1): most significant bit first"
    return record
