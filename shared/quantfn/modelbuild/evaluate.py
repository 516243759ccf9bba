"""The one evaluator: a model folder answers through ``quantfn.tasks.open_pipeline``, exactly as the API serves it.

Every figure a build is gated on comes from here. The staged model and its fp32
original (``pipeline.fp32_original``) answer the same items through the runtime's
own task pipeline (tokenizer, truncation, length-sorted sub-batches, the session as
the manifest says, pooling, normalisation, prompts left out), and ``compare`` measures
the one against the other with the pure ``metrics``. Items are the gate corpus
(``corpora``, never fitted to): texts for embed and classify, (query, document) pairs
made from it for rerank.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantfn.modelbuild import metrics
from quantfn.tasks.classify import label_scores

if TYPE_CHECKING:
    from quantfn.tasks import Pipeline

Item = str | tuple[str, str]
# Items embedded alone and inside one request, for batch invariance.
INVARIANCE_ITEMS = 64
# Bump when what a part's outputs are changes: cached outputs of the old kind are ignored.
PROTOCOL = 2


def items_for(pair: bool, texts: list[str]) -> list[Item]:
    """What a task is evaluated on: the texts, or pairs (text, a related or unrelated text) for a cross-encoder."""
    if not pair:
        return list(texts)
    n = len(texts)
    # Neighbours in the corpus are often on one topic, far ones rarely: both kinds of pair.
    return [(texts[i], texts[(i + 1) % n] if i % 2 else texts[(i * 7 + 3) % n]) for i in range(n)]


def open_model(folder: Path, threads: int = 2) -> Pipeline:
    """The runtime's pipeline for a model folder, opened as the registry opens it."""
    from quantfn.models.manifest import Manifest
    from quantfn.tasks import open_pipeline

    folder = Path(folder)
    return open_pipeline(folder, Manifest.read(folder), threads)


def answers(pipeline: Pipeline, items: list[Item]) -> np.ndarray:
    """The task's answers for ``items``, in order: pooled vectors (embed), logits (classify), scores (rerank)."""
    return np.asarray(pipeline.forward(pipeline.encode(items)), np.float32)


def _key(folder: Path, part: str, items: list[Item]) -> str:
    """A cache key for one model's answers on one part: the files' digests (as the manifest lists them), the
    session and cascade, the items."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    files = sorted((name, entry["sha256"]) for name, entry in manifest["files"].items())
    how = [manifest.get("session", {})] + ([manifest["cascade"]] if "cascade" in manifest else [])
    payload = json.dumps([PROTOCOL, files, *how, items], sort_keys=True)
    return f"{part}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def outputs(
    folder: Path,
    parts: dict[str, list[Item]],
    cache: Path | None = None,
    threads: int = 2,
    pipeline: Pipeline | None = None,
) -> dict[str, np.ndarray]:
    """``folder``'s answers on each part, cached in ``cache/outputs`` by the model's file digests and the items."""
    result = {}
    for part, items in parts.items():
        path = None if cache is None else Path(cache) / "outputs" / f"{_key(folder, part, items)}.npy"
        if path is not None and path.is_file():
            result[part] = np.load(path)
            continue
        pipeline = pipeline or open_model(folder, threads)
        result[part] = answers(pipeline, items)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, result[part])
            tmp.replace(path)
    return result


def compare(task: str, got: np.ndarray, want: np.ndarray, scoring: str = "none") -> dict[str, float]:
    """The task's fidelity figures of answers ``got`` against the fp32 original's ``want`` (same items).

    ``scoring`` (a classifier's manifest's) turns logits into the probabilities the API serves.
    """
    if task == "embed":
        cos = metrics.cosines(got, want)
        return {
            "cosine_mean": float(cos.mean()),
            "cosine_p1": float(np.percentile(cos, 1)),
            "cosine_min": float(cos.min()),
            "spearman": metrics.spearman_pairwise(got, want),
            "recall_at_5": metrics.recall_at_k(got, want, 5),
        }
    if task == "classify":
        return {
            "top1_agreement": float((got.argmax(axis=1) == want.argmax(axis=1)).mean()),
            "max_abs_score_diff": float(np.abs(label_scores(got, scoring) - label_scores(want, scoring)).max()),
        }
    return {
        "score_spearman": metrics.spearman(got, want),
        "max_abs_score_diff": float(np.abs(got.astype(np.float64) - want).max()),
    }


def batch_invariance(pipeline: Pipeline, items: list[Item]) -> dict[str, float]:
    """Each item answered alone against inside one request of all ``items`` (mixed lengths): the worst cosine
    (embed) or the largest difference (logits, scores)."""
    together = answers(pipeline, items)
    alone = np.concatenate([answers(pipeline, [item]) for item in items])
    if pipeline.task == "embed":
        return {"batch_invariance_min_cosine": metrics.cosine_stats(alone, together)[1]}
    return {"batch_invariance_max_abs_diff": float(np.abs(alone - together).max())}


def measure(
    folder: Path, baseline: Path, items: list[Item], cache: Path | None = None, threads: int = 2
) -> dict[str, float]:
    """Fidelity of model ``folder`` against its fp32 original ``baseline`` on ``items`` (rounded to 6 places)."""
    pipeline = open_model(folder, threads)
    got = outputs(folder, {"corpus": items}, cache, threads, pipeline)["corpus"]
    want = outputs(baseline, {"corpus": items}, cache, threads)["corpus"]
    figures = compare(pipeline.task, got, want, pipeline.manifest.scoring)
    figures.update(batch_invariance(pipeline, items[:INVARIANCE_ITEMS]))
    return {name: round(value, 6) for name, value in figures.items()}
