"""The tokenizer.json a model ships: truncation, padding, facts for the manifest, and a pruned vocabulary.

Pruning drops unreachable rows from the vocabulary (and so from the embedding table).

BERT's vocabulary reserves 994 ``[unusedN]`` entries. The pre-tokenizer splits
``[`` and ``]`` off as punctuation and none of them is an added token, so the
tokenizer can never emit them; their embedding rows are dead weight (0.4 MB at
int8). Pruning renumbers the surviving tokens densely, in their old order, in
both tokenizer.json and the table, which therefore must ship together (they do:
one model folder, one manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from quantfn.modelbuild.errors import BuildError


def unreachable_ids(tokenizer: dict[str, Any]) -> list[int]:
    """Ids of ``[unused...]`` vocabulary entries that are not added (special) tokens (WordPiece vocabularies;
    a SentencePiece one, a list of pieces, has none)."""
    added = {token["id"] for token in tokenizer.get("added_tokens", [])}
    vocab = tokenizer["model"].get("vocab")
    if not isinstance(vocab, dict):
        return []
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


def write_tokenizer(src: Path, dst: Path, prune_vocab: bool, max_length: int) -> np.ndarray | None:
    """Write tokenizer.json with truncation at ``max_length`` and pad-to-longest with the source's own pad token
    (whatever truncation and padding the source file had baked in are replaced).

    With ``prune_vocab`` the unreachable entries (if any) are dropped and ids renumbered; returns the kept
    old ids (the embedding rows to keep), else None.
    """
    data = json.loads(src.read_text(encoding="utf-8"))
    pad_id, pad_token = source_pad(data)
    keep = None
    drop = unreachable_ids(data) if prune_vocab else []
    if drop:
        data, keep = prune_tokenizer(data, drop)
        pad_id = int(np.searchsorted(keep, pad_id))
    data["truncation"] = {
        "direction": "Right",
        "max_length": max_length,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    data["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": pad_id,
        "pad_type_id": 0,
        "pad_token": pad_token,
    }
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return keep


def source_pad(data: dict[str, Any]) -> tuple[int, str]:
    """The pad ``(id, token)`` a tokenizer.json declares: its padding, else its pad special token."""
    vocab = (data.get("model") or {}).get("vocab") or {}
    vocab = vocab if isinstance(vocab, dict) else {}
    padding = data.get("padding") or {}
    if padding.get("pad_token"):
        return int(padding.get("pad_id", vocab.get(padding["pad_token"], 0))), str(padding["pad_token"])
    for token in data.get("added_tokens", []):
        if token.get("special") and token["content"].strip("[]<>").lower() in ("pad", "padding"):
            return int(token["id"]), str(token["content"])
    raise BuildError("the tokenizer declares no pad token: set its padding (tokenizer.enable_padding) and save it")


def tokenizer_facts(path: Path) -> dict[str, Any]:
    """What the manifest records of a tokenizer.json: padding, special tokens and the pair template.

    Read from the file itself (its post-processor and added tokens), so no token is a literal anywhere.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    special = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
    post = data.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    pair_template = ""
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            pair_template = " ".join(
                piece["SpecialToken"]["id"] if "SpecialToken" in piece else "$" + piece["Sequence"]["id"]
                for piece in processor.get("pair", [])
            )
        elif processor.get("type") in ("BertProcessing", "RobertaProcessing"):
            cls, sep = processor["cls"][0], processor["sep"][0]
            between = f"{sep} {sep}" if processor["type"] == "RobertaProcessing" else sep
            pair_template = f"{cls} $A {between} $B {sep}"
    padding = data.get("padding") or {}
    pad_token = padding.get("pad_token") or next((t for t in special if "pad" in t.lower()), "")
    vocab = (data.get("model") or {}).get("vocab") or {}
    pad_id = padding.get("pad_id", vocab.get(pad_token, 0) if isinstance(vocab, dict) else 0)
    return {
        "file": path.name,
        "pad_id": int(pad_id),
        "pad_token": pad_token,
        "special_tokens": special,
        "pair_template": pair_template,
    }


def first_unreachable_id(tokenizer_path: Path) -> int:
    """The lowest id vocabulary pruning would drop (ids below it keep their number); -1 if none."""
    drop = unreachable_ids(json.loads(Path(tokenizer_path).read_text(encoding="utf-8")))
    return drop[0] if drop else -1


def ids_only_looked_up(graph_path: Path, stable_below: int = 0) -> bool:
    """Whether ``input_ids`` feeds only the word-embedding Gather, Shape nodes, and comparisons
    (``Equal``) with constant ids below ``stable_below`` (ids pruning does not renumber)."""
    import onnx
    from onnx import numpy_helper

    from quantfn.modelbuild.export import WORD_EMBEDDINGS

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) <= 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def allowed(node: Any) -> bool:
        if node.op_type == "Shape":
            return True
        if node.op_type == "Gather":
            return node.input[0] == WORD_EMBEDDINGS
        if node.op_type == "Equal":
            other = [name for name in node.input if name != "input_ids"]
            if len(other) == 1 and other[0] in constants:
                ids = np.asarray(constants[other[0]])
                return stable_below < 0 or bool((ids >= 0).all() and (ids < stable_below).all())
        return False

    return all(allowed(n) for n in graph.node if "input_ids" in n.input)


def prunable(graph_path: Path, tokenizer_path: Path, architecture: str) -> bool:
    """Whether pruning may renumber ids for this graph: the BERT writer's (it looks ids up in one table), or a
    graph that uses ``input_ids`` for nothing but the table lookup and comparisons with ids that keep their
    number (MPNet's padding test)."""
    return architecture == "bert" or ids_only_looked_up(graph_path, first_unreachable_id(tokenizer_path))
