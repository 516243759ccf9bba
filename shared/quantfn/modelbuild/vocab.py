"""Pruning unreachable rows from the vocabulary (and so from the embedding table).

BERT's vocabulary reserves 994 ``[unusedN]`` entries. The pre-tokenizer splits
``[`` and ``]`` off as punctuation and none of them is an added token, so the
tokenizer can never emit them; their embedding rows are dead weight (0.4 MB at
int8). Pruning renumbers the surviving tokens densely, in their old order, in
both tokenizer.json and the table, which therefore must ship together (they do:
one model folder, one manifest).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def unreachable_ids(tokenizer: dict[str, Any]) -> list[int]:
    """Ids of ``[unused...]`` vocabulary entries that are not added (special) tokens."""
    added = {token["id"] for token in tokenizer.get("added_tokens", [])}
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    return sorted(i for tok, i in vocab.items() if tok.startswith("[unused") and tok.endswith("]") and i not in added)


def prune_tokenizer(tokenizer: dict[str, Any], drop: list[int]) -> tuple[dict[str, Any], np.ndarray]:
    """Return a renumbered tokenizer without ``drop`` and ``keep`` (old id of each new id)."""
    size = len(tokenizer["model"]["vocab"])
    keep = np.setdiff1d(np.arange(size), np.asarray(drop, dtype=np.int64))
    new_id = np.full(size, -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    data = dict(tokenizer)
    data["model"] = dict(tokenizer["model"])
    data["model"]["vocab"] = {tok: int(new_id[i]) for tok, i in tokenizer["model"]["vocab"].items() if new_id[i] >= 0}
    data["added_tokens"] = [{**token, "id": int(new_id[token["id"]])} for token in tokenizer.get("added_tokens", [])]
    post = tokenizer.get("post_processor") or {}
    if post.get("special_tokens"):
        data["post_processor"] = {
            **post,
            "special_tokens": {
                name: {**spec, "ids": [int(new_id[i]) for i in spec["ids"]]}
                for name, spec in post["special_tokens"].items()
            },
        }
    if post.get("type") in ("BertProcessing", "RobertaProcessing"):
        data["post_processor"] = {
            **post,
            **{key: [post[key][0], int(new_id[post[key][1]])] for key in ("sep", "cls") if key in post},
        }
    if isinstance(data.get("padding"), dict):
        data["padding"] = {**data["padding"], "pad_id": int(new_id[data["padding"].get("pad_id", 0)])}
    return data, keep
