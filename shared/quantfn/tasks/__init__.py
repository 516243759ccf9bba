"""Tasks: one base pipeline (tokenize -> run -> post-process) and a small class per task.

``open_pipeline`` is the one place a model folder becomes a runnable pipeline:
the manifest's ``task`` picks the class, ``quantfn.models.session`` opens the
onnxruntime session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantfn.models.manifest import Manifest
from quantfn.tasks.base import Encoded, Pipeline, load_tokenizer
from quantfn.tasks.classify import ClassifyPipeline
from quantfn.tasks.embed import EmbedPipeline
from quantfn.tasks.rerank import RerankPipeline

PIPELINES: dict[str, type[Pipeline]] = {"embed": EmbedPipeline, "rerank": RerankPipeline, "classify": ClassifyPipeline}


def open_pipeline(
    folder: Path,
    manifest: Manifest,
    threads: int,
    batch_size: int = 32,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    tokenizer: object | None = None,
) -> Pipeline:
    """The pipeline for a verified model folder: session (on ``providers``), tokenizer, manifest."""
    from quantfn.models.session import open_session

    session = open_session(folder / "model.onnx", manifest, threads, providers)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder / "tokenizer.json")
    return PIPELINES[manifest.task](session, tokenizer, manifest, batch_size)


__all__ = [
    "PIPELINES",
    "ClassifyPipeline",
    "EmbedPipeline",
    "Encoded",
    "Pipeline",
    "RerankPipeline",
    "load_tokenizer",
    "open_pipeline",
]
