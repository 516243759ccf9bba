"""Tasks: what differs by task, one module each (embed, rerank, classify).

Each module holds the task's request, its ``Task`` (the request-level work
``quantfn.inference.run`` asks for: checks, tokens, reply size, running here or on
the endpoint) and its ``Pipeline`` (tokenize -> run -> post-process on a session).
``TASKS`` maps a request's ``task`` to its ``Task``. ``open_pipeline`` is the one
place a model folder becomes a runnable pipeline: the manifest's ``task`` picks the
class, ``quantfn.models.session`` opens the onnxruntime session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantfn.config import PARALLELISM
from quantfn.models.manifest import Manifest
from quantfn.models.session import cpu_only
from quantfn.tasks.base import Encoded, Pipeline, load_tokenizer
from quantfn.tasks.classify import ClassifyPipeline, ClassifyRequest, ClassifyTask
from quantfn.tasks.embed import EmbedPipeline, EmbedRequest, EmbedTask
from quantfn.tasks.rerank import RerankPipeline, RerankRequest, RerankTask
from quantfn.tasks.task import Forward, Task, Tokens, ranked

PIPELINES: dict[str, type[Pipeline]] = {"embed": EmbedPipeline, "rerank": RerankPipeline, "classify": ClassifyPipeline}
#: Each request's ``task`` -> the Task that does its work.
TASKS: dict[str, Task] = {task.name: task for task in (EmbedTask(), RerankTask(), ClassifyTask())}
Request = EmbedRequest | RerankRequest | ClassifyRequest


def parallel_mode(parallelism: str, threads: int, providers: Sequence[str]) -> str:
    """The ``parallelism`` a pipeline really gets: ``"intra"`` on one thread or any provider but the CPU's."""
    if parallelism not in PARALLELISM:
        raise ValueError(f"parallelism must be one of {', '.join(PARALLELISM)}, not {parallelism!r}")
    return parallelism if threads > 1 and cpu_only(providers) else "intra"


def open_pipeline(
    folder: Path,
    manifest: Manifest,
    threads: int,
    batch_size: int = 32,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    tokenizer: object | None = None,
    parallelism: str = "auto",
) -> Pipeline:
    """The pipeline for a verified model folder: session (on ``providers``), tokenizer, manifest.

    How ``threads`` CPU threads are spent (``parallelism``; other providers always get ``"intra"``):
    ``"intra"``: one session of ``threads`` intra-op threads, one piece of a batch at a time;
    ``"data"``: one session of one intra-op thread, ``threads`` pieces of a batch at once;
    ``"auto"``: ``"intra"``'s session for a request of one piece (one text is faster on every thread),
    and a second session of one thread, made on the first request of more pieces, for those. A classifier's
    ``cascade`` graph is opened on its first near tie: one session of one intra-op thread that ``threads`` pieces
    of the near ties run on at once.
    """
    from quantfn.models.session import open_session

    mode = parallel_mode(parallelism, threads, providers)
    model_file = folder / "model.onnx"
    session = open_session(model_file, manifest, 1 if mode == "data" else threads, providers)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder / "tokenizer.json")
    pipeline = PIPELINES[manifest.task](
        session,
        tokenizer,
        manifest,
        batch_size,
        workers=1 if mode == "intra" else threads,
        open_piece_session=(lambda: open_session(model_file, manifest, 1, providers)) if mode == "auto" else None,
    )
    if isinstance(pipeline, ClassifyPipeline) and (cascade := manifest.cascade) is not None:
        # One intra-op thread, pieces of the near ties at once on ``threads`` workers: a second session with a
        # thread pool of its own would contend with the first's spinning workers (2.3x slower for one text on
        # two vCPUs, bench/QUANTIZATION.md round 13). Another provider runs the second graph as the first.
        cpu = cpu_only(providers)
        pipeline.open_cascade = lambda: ClassifyPipeline(
            open_session(folder / cascade.file, manifest, 1 if cpu else threads, providers, cascade.session),
            tokenizer,
            manifest,
            batch_size,
            workers=threads if cpu else 1,
        )
    return pipeline


__all__ = [
    "PARALLELISM",
    "PIPELINES",
    "TASKS",
    "ClassifyPipeline",
    "ClassifyRequest",
    "EmbedPipeline",
    "EmbedRequest",
    "Encoded",
    "Forward",
    "Pipeline",
    "Request",
    "RerankPipeline",
    "RerankRequest",
    "Task",
    "Tokens",
    "load_tokenizer",
    "open_pipeline",
    "parallel_mode",
    "ranked",
]
