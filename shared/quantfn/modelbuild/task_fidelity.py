"""Fidelity of any planned build against its own fp32 graph, per task.

The default model is measured against stored sentence-transformers vectors
(``evaluate``); a model someone brings has no stored reference, so its fp32
export is the reference (the export itself is tested equal to torch within
1e-4 in CI). Items are the fidelity corpus: texts for embed and classify,
(query, document) pairs made from it for rerank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.modelbuild.evaluate import cosine_stats, recall_at_k, spearman_pairwise

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from quantfn.modelbuild.architectures import BuildPlan

Item = str | tuple[str, str]
# A quantized reranker must order its scores as the fp32 graph does this closely (a classifier's top-1
# agreement is the gate's own ``top1_agreement``).
RERANK_SPEARMAN_GATE = 0.99


def items_for(plan: BuildPlan, texts: list[str]) -> list[Item]:
    """What the task is evaluated on: the texts, or pairs (text, a related or unrelated text)."""
    if not plan.pair:
        return list(texts)
    n = len(texts)
    # Neighbours in the corpus are often on one topic, far ones rarely: both kinds of pair.
    return [(texts[i], texts[(i + 1) % n] if i % 2 else texts[(i * 7 + 3) % n]) for i in range(n)]


def feed(tokenizer: Tokenizer, items: list[Item], inputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The graph's inputs for ``items``, padded to the longest (the tokenizer's own settings)."""
    encodings = tokenizer.encode_batch(items)
    arrays = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }
    return {name: arrays[name] for name in inputs}


def _post(plan: BuildPlan, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if plan.task != "embed" or plan.output_kind == "sentence_embedding":
        vectors = out
    elif plan.pooling == "cls":
        vectors = out[:, 0]
    else:
        vectors = (out * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    if plan.task == "embed" and plan.normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors.astype(np.float32)


def run(session: Any, tokenizer: Tokenizer, plan: BuildPlan, items: list[Item], batch_size: int = 32) -> np.ndarray:
    """Outputs for ``items`` in their order: pooled vectors (embed) or logits; length-sorted sub-batches."""
    lengths = [len(e.ids) for e in tokenizer.encode_batch(items)]
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(items), batch_size):
        batch = order[start : start + batch_size]
        inputs = feed(tokenizer, [items[i] for i in batch], plan.inputs)
        values = _post(plan, session.run([plan.output], inputs)[0], inputs["attention_mask"])
        if out is None:
            out = np.zeros((len(items), *values.shape[1:]), np.float32)
        out[batch] = values
    assert out is not None
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _scores(plan: BuildPlan, logits: np.ndarray) -> np.ndarray:
    if plan.scoring == "softmax":
        return _softmax(logits.astype(np.float64))
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def measure(
    session: Any, tokenizer: Tokenizer, plan: BuildPlan, items: list[Item], reference: np.ndarray
) -> dict[str, float]:
    """The task's fidelity metrics of ``session`` against ``reference`` (the fp32 graph's outputs)."""
    got = run(session, tokenizer, plan, items)
    # Batch invariance: the first 64 items alone against inside their mixed-length batch.
    alone = np.concatenate([run(session, tokenizer, plan, [item]) for item in items[:64]])
    together = run(session, tokenizer, plan, items[:64], batch_size=64)
    if plan.task == "embed":
        mean, low = cosine_stats(got, reference)
        return {
            "cosine_mean": mean,
            "cosine_min": low,
            "spearman": spearman_pairwise(got, reference),
            "recall_at_5": recall_at_k(got, reference, 5),
            "batch_invariance_min_cosine": cosine_stats(alone, together)[1],
        }
    if plan.task == "classify":
        return {
            "top1_agreement": float((got.argmax(axis=1) == reference.argmax(axis=1)).mean()),
            "max_abs_score_diff": float(np.abs(_scores(plan, got) - _scores(plan, reference)).max()),
            "batch_invariance_max_abs_logit_diff": float(np.abs(alone - together).max()),
        }
    score, ref = got[:, 0].astype(np.float64), reference[:, 0].astype(np.float64)
    a, b = np.argsort(np.argsort(score)), np.argsort(np.argsort(ref))
    return {
        "score_spearman": float(np.corrcoef(a, b)[0, 1]),
        "max_abs_score_diff": float(np.abs(_scores(plan, got[:, :1]) - _scores(plan, reference[:, :1])).max()),
        "batch_invariance_max_abs_logit_diff": float(np.abs(alone - together).max()),
    }


def gate_record(plan: BuildPlan, gate: Any) -> dict[str, float | None]:
    """The minimums this plan's build was held to (the manifest's ``fidelity.gate``)."""
    if plan.task == "classify":
        return {"top1_agreement": gate.top1_agreement}
    if plan.task == "rerank":
        return {"score_spearman": RERANK_SPEARMAN_GATE}
    return gate.as_dict()


def gate_failure(plan: BuildPlan, fidelity: dict[str, float], gate: Any) -> tuple[str, float, float] | None:
    """``(metric, value, minimum)`` of the first metric below its gate, else None."""
    if plan.task == "classify":
        checks = [("top1_agreement", gate.top1_agreement)]
    elif plan.task == "rerank":
        checks = [("score_spearman", RERANK_SPEARMAN_GATE)]
    else:
        checks = [(m, getattr(gate, m)) for m in ("cosine_mean", "recall_at_5", "batch_invariance_min_cosine")]
    for metric, minimum in checks:
        if minimum is not None and fidelity[metric] < minimum:
            return metric, fidelity[metric], minimum
    return None
