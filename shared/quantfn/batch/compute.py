"""The one inference call per chunk: checked items in, one output (or one per-line error) per item out.

Lines go through the same tasks and the same entry point as API requests, and their records
take the API's own item shapes (``quantfn.wire``): an embedding, the ranked labels, the ranked results.
"""

from __future__ import annotations

from typing import Any

from quantfn import inference
from quantfn.batch.records import Item, Problem
from quantfn.errors import QuantfnError
from quantfn.tasks import TASKS, ClassifyRequest, EmbedRequest, RerankRequest
from quantfn.wire.classify import ranked_labels
from quantfn.wire.rerank import ranked_results

# The runner keeps its own time (a chunk that will not fit goes to a follow-up), so inference gets no deadline
# here: a prediction that a chunk may run long must not fail it. No GPU endpoint for batch: a shard is sized to
# fit the function.
_BUDGET = inference.Budget(None, allow_endpoint=False, per_input_errors=True)


def infer_chunk(registry: Any, task: str, model: str, items: list[Item]) -> list[dict[str, Any] | Problem]:
    """Run ``items`` through ``model`` for ``task``; an input the model refuses is its own error, never the chunk's.

    embed -> {"embedding": [...]}; classify -> {"labels": [{"label", "score"}]} (best first);
    rerank -> {"results": [{"index", "relevance_score"}]} (best first). Raises for what a retry may fix.
    """
    if not items:
        return []
    if task == "rerank":
        return [_rerank(registry, model, item) for item in items]
    texts = [item.text for item in items]
    request = EmbedRequest(texts, model) if task == "embed" else ClassifyRequest(texts, model)
    result = inference.run(request, _BUDGET, registry)
    rows = dict(zip(result.ok, result.output, strict=True))
    if task == "embed":
        return [result.errors.get(i) or {"embedding": rows[i]} for i in range(len(items))]
    return [result.errors.get(i) or {"labels": ranked_labels(result, rows[i])} for i in range(len(items))]


def _rerank(registry: Any, model: str, item: Item) -> dict[str, Any] | Problem:
    try:
        result = inference.run(RerankRequest(item.query, list(item.documents), model), _BUDGET, registry)
    except QuantfnError as error:
        if error.status >= 500:
            raise
        return (error.code, error.message)
    if result.errors:
        index, (code, message) = min(result.errors.items())
        return (code, f"documents[{index}]: {message}")
    return {"results": ranked_results(result)}


def check_model(registry: Any, model: str, task: str) -> None:
    """404 for a model not served here, 400 for one that cannot do ``task``: from the manifest, no session."""
    registry.resolve(model, TASKS[task])


def model_record(registry: Any, model: str, task: str) -> dict[str, Any]:
    """What the manifest says about the model that produced the results."""
    manifest = registry.manifest(registry.resolve(model, TASKS[task]))
    return {
        "id": manifest.model_id,
        "sha256": manifest.files["model.onnx"].sha256,
        "recipe": manifest.raw.get("quantization", {}).get("recipe"),
    }
