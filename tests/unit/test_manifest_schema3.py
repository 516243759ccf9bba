"""Manifest schema 3: the runtime dispatches on it alone, so every inconsistency is refused up front."""

from __future__ import annotations

from typing import Any

import pytest

from quantfn.errors import ModelUnavailable
from quantfn.models.manifest import Manifest

HUGE = {"sha256": "", "size": 1e400}
FILES = {"model.onnx": {"sha256": "0" * 64, "size": 10}, "tokenizer.json": {"sha256": "1" * 64, "size": 5}}
BASE = {"schema": 3, "model_id": "m", "files": FILES, "max_sequence_length": 128, "inputs": ["input_ids"]}


def manifest(**fields: Any) -> Manifest:
    return Manifest.from_dict({**BASE, **fields})


def test_an_embedder_reads_its_pooling_normalisation_prompts_and_pad_id() -> None:
    m = manifest(
        task="embed",
        output="last_hidden_state",
        dimensions=768,
        pooling="cls",
        normalize=False,
        prompts={"query": "query: ", "document": "passage: "},
        tokenizer={"pad_id": 1},
    )
    assert (m.task, m.pooling, m.normalize, m.dimensions, m.pad_id) == ("embed", "cls", False, 768, 1)
    assert m.prompts["query"] == "query: "


def test_a_graph_that_already_pools_says_so_with_output_kind() -> None:
    m = manifest(task="embed", output="461", output_kind="sentence_embedding", pooling="none", dimensions=384)
    assert m.pooling == "none"
    with pytest.raises(ModelUnavailable, match="pooling 'none'"):
        manifest(task="embed", output="461", pooling="none", dimensions=384)


def test_a_classifier_needs_distinct_labels_and_scores_as_declared() -> None:
    m = manifest(task="classify", output="logits", labels=["a", "b", "c"], scoring="sigmoid")
    assert m.dimensions == 3 and m.multi_label
    assert manifest(task="classify", output="logits", labels=["a", "b"]).scoring == "softmax"
    for labels in ([], ["a", "a"]):
        with pytest.raises(ModelUnavailable, match="labels"):
            manifest(task="classify", output="logits", labels=labels)


def test_a_reranker_reads_pairs() -> None:
    m = manifest(task="rerank", output="logits", pair=True, inputs=["input_ids", "attention_mask", "token_type_ids"])
    assert m.pair and m.scoring == "sigmoid" and m.dimensions == 1
    with pytest.raises(ModelUnavailable, match="pair"):
        manifest(task="rerank", output="logits")


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"task": "summarize", "output": "x"}, "'task' must be one of"),
        ({"task": "embed", "output": "x", "dimensions": 8, "pooling": "weightedmean"}, "'pooling' must be one of"),
        ({"task": "classify", "output": "x", "labels": ["a"], "output_kind": "token_embeddings"}, "output_kind"),
        ({"task": "embed", "output": "x", "dimensions": 8, "files": {"model.onnx": FILES["model.onnx"]}}, "tokenizer"),
        ({"task": "embed", "output": "x", "dimensions": 8, "schema": 5}, "newer"),
        ({"task": "embed", "output": "x", "dimensions": 8, "files": {**FILES, "w": HUGE}}, "infinity"),
    ],
)
def test_inconsistent_manifests_are_refused_naming_the_field(fields: dict, fragment: str) -> None:
    with pytest.raises(ModelUnavailable, match=fragment):
        manifest(**fields)


def test_a_schema_2_folder_still_loads_as_the_mean_pooled_embedder() -> None:
    m = Manifest.from_dict({**BASE, "schema": 2, "task": "embedding", "output": "h", "dimensions": 384})
    assert (m.task, m.pooling, m.normalize, m.architecture, m.pad_id) == ("embed", "mean", True, "bert", 0)


def test_an_older_schema_is_refused_with_how_to_rebuild() -> None:
    with pytest.raises(ModelUnavailable, match="quantfn build-model"):
        Manifest.from_dict({**BASE, "schema": 2, "task": "classification", "output": "h", "dimensions": 3})
