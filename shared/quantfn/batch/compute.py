"""The one inference call per chunk: checked items in, one output (or one per-line error) per item out."""

from __future__ import annotations

from typing import Any

from quantfn.batch.jobs import BadJob
from quantfn.batch.records import Item, Problem
from quantfn.tasks.embedding import Tokenized


def infer_chunk(service: Any, task: str, model: str, items: list[Item]) -> list[dict[str, Any] | Problem]:
    """Run ``items`` through ``model`` for ``task``; an over-long input is its own error, never the chunk's.

    embed -> {"embedding": [...]}; classify -> {"labels": [{"label", "score"}]};
    rerank -> {"results": [{"index", "relevance_score"}]}.
    """
    if task != "embed":
        raise BadJob(f"'task' {task!r} is not served by this deployment's model (embed).", param="task")
    service.check_model(model)
    encoder = service.model()
    if not items:
        return []
    tokens = encoder.tokenize([item.text for item in items])
    limit = service.settings.max_input_tokens
    outputs: list[dict[str, Any] | Problem] = []
    keep = []
    for ids in tokens.ids:
        if len(ids) > limit:
            outputs.append(("text_too_long", f"{len(ids)} tokens, limit {limit} (QUANTFN_MAX_INPUT_TOKENS)"))
        else:
            outputs.append({})
            keep.append(ids)
    vectors = iter(encoder.embed(Tokenized(keep)) if keep else [])
    return [output if isinstance(output, tuple) else {"embedding": next(vectors)} for output in outputs]


def model_record(service: Any) -> dict[str, Any]:
    """What the manifest says about the model that produced the results."""
    manifest = service.manifest()
    return {
        "id": manifest.model_id,
        "sha256": manifest.files["model.onnx"].sha256,
        "recipe": manifest.raw.get("quantization", {}).get("recipe"),
    }
