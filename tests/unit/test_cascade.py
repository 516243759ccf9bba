"""A classifier's cascade: the int8 graph answers every input, the second graph the near ties, by real onnxruntime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantfn.errors import ModelUnavailable
from quantfn.modelbuild.cascade import QUANTILE, margin
from quantfn.modelbuild.source import locate_source
from quantfn.models.manifest import Manifest, describe_file, verify_folder
from quantfn.tasks import open_pipeline
from quantfn.tasks.base import load_tokenizer
from quantfn.tasks.classify import near_ties

LABELS = ["a", "b", "c"]
TEXTS = [f"text number {i} about {word}" for i, word in enumerate(["cats", "dogs", "rain", "tax", "code"] * 8)]


def test_given_softmax_logits_when_the_top_two_are_closer_than_the_margin_then_the_row_is_a_near_tie() -> None:
    logits = np.array([[3.0, 2.9, -1.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 4.5]], np.float32)
    assert near_ties(logits, "softmax", 0.2).tolist() == [True, False, True, False]
    assert near_ties(logits, "softmax", 0.6).tolist() == [True, False, True, True]
    assert not near_ties(logits, "softmax", 0.0).any()


def test_given_sigmoid_logits_when_any_label_is_within_the_margin_of_zero_then_the_row_is_a_near_tie() -> None:
    logits = np.array([[3.0, -2.0], [0.05, 4.0], [-0.1, -6.0]], np.float32)
    assert near_ties(logits, "sigmoid", 0.2).tolist() == [False, True, True]
    # one logit (a binary head) reads as sigmoid whatever the scoring says: its decision is its sign
    assert near_ties(logits[:, :1], "softmax", 0.2).tolist() == [False, True, True]


def test_given_calibration_logits_when_the_margin_is_set_then_it_covers_the_quantile_of_the_winners_lead_lost() -> None:
    rng = np.random.default_rng(0)
    fp32 = rng.standard_normal((1000, 4)).astype(np.float32)
    int8 = fp32.copy()
    winners = int8.argmax(axis=1)
    lost = np.linspace(0.0, 0.5, 1000)
    int8[np.arange(1000), winners] += lost  # the int8 winner gained `lost` on every other label
    found = margin(int8, fp32, "softmax")
    assert found["margin"] == pytest.approx(float(np.quantile(lost, QUANTILE)), abs=1e-5)
    assert found["calibration"]["texts"] == 1000 and found["calibration"]["move_max"] == pytest.approx(0.5)
    # where int8 only shrank the winner's lead (it is still the winner), fp32's lead is larger: no margin needed
    clear = fp32 + 5 * np.eye(4, dtype=np.float32)[winners]
    assert margin(clear - 0.5 * np.eye(4, dtype=np.float32)[winners], clear, "softmax")["margin"] == 0.0
    # where int8 widened it, the other labels are nearer in fp32: the margin covers the widening
    assert margin(clear + 0.5 * np.eye(4, dtype=np.float32)[winners], clear, "softmax")["margin"] == pytest.approx(0.5)
    # sigmoid: each label's own |move|, whichever way it went
    moved = fp32 - lost[:, None].astype(np.float32)
    assert margin(moved, fp32, "sigmoid")["margin"] == pytest.approx(float(np.quantile(lost, QUANTILE)), abs=1e-5)


def _graph(path: Path, table: np.ndarray) -> None:
    """logits[b] = sum over the row's tokens of table[token] (the pad token's row is zero)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
            helper.make_node("ReduceSum", ["rows", "axes"], ["logits"], keepdims=0),
        ],
        "sum",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, table.shape[1]])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1]), "axes")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.fixture
def cascade_folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A classifier whose int8 graph and second graph are two tables (the second shifted by +10: tell-tale)."""
    folder = tmp_path / "cascade"
    folder.mkdir()
    shutil.copy(locate_source().tokenizer, folder / "tokenizer.json")
    vocab = load_tokenizer(folder / "tokenizer.json").get_vocab_size()
    rng = np.random.default_rng(3)
    first = rng.standard_normal((vocab, 3)).astype(np.float32) * 0.3
    first[0] = 0.0  # the pad id
    second = first + np.float32(10.0)
    second[0] = 0.0
    _graph(folder / "model.onnx", first)
    _graph(folder / "fallback.onnx", second)
    manifest = _manifest(folder, {"file": "fallback.onnx", "margin": 0.3, "session": {"pre_optimized": False}})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, first, second


def _manifest(folder: Path, cascade: dict[str, Any], **fields: Any) -> dict[str, Any]:
    names = ("model.onnx", "fallback.onnx", "tokenizer.json")
    return {
        "schema": 4,
        "model_id": "cascade",
        "task": "classify",
        "files": {name: describe_file(folder / name) for name in names if (folder / name).exists()},
        "max_sequence_length": 64,
        "inputs": ["input_ids"],
        "output": "logits",
        "labels": LABELS,
        "cascade": cascade,
        **fields,
    }


def test_given_a_cascade_when_texts_are_classified_then_near_ties_come_from_the_second_graph(cascade_folder) -> None:
    folder, first, second = cascade_folder
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)
    assert manifest.cascade is not None and manifest.cascade.margin == 0.3
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    ids = [e.ids for e in tokenizer.encode_batch(TEXTS)]
    main = np.stack([first[row].sum(axis=0) for row in ids])
    tied = near_ties(main, "softmax", 0.3)
    assert 0 < tied.sum() < len(TEXTS)  # both paths are taken
    want = np.where(tied[:, None], np.stack([second[row].sum(axis=0) for row in ids]), main)

    pipeline = open_pipeline(folder, manifest, threads=1)
    got = pipeline.classify(TEXTS, raw_scores=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a request without a near tie never opens the second graph
    clear = [text for text, tie in zip(TEXTS, tied, strict=True) if not tie]
    fresh = open_pipeline(folder, manifest, threads=1)
    np.testing.assert_allclose(fresh.classify(clear, raw_scores=True), main[~tied], rtol=1e-5, atol=1e-5)
    assert fresh._cascade is None


@pytest.mark.parametrize(
    ("cascade", "fields", "fragment"),
    [
        ({"file": "model.onnx", "margin": 0.3}, {}, "another .onnx graph"),
        ({"file": "missing.onnx", "margin": 0.3}, {}, "another .onnx graph"),
        ({"file": "fallback.onnx", "margin": -1}, {}, "margin"),
        ({"file": "fallback.onnx", "margin": float("inf")}, {}, "margin"),
        ({"file": "fallback.onnx", "margin": 0.3}, {"task": "embed", "dimensions": 3}, "classify"),
        ({"file": "fallback.onnx", "margin": 0.3}, {"schema": 5}, "newer"),
    ],
)
def test_given_a_bad_cascade_when_the_manifest_is_read_then_it_is_refused_naming_the_field(
    cascade_folder, cascade: dict[str, Any], fields: dict[str, Any], fragment: str
) -> None:
    folder, _, _ = cascade_folder
    with pytest.raises(ModelUnavailable, match=fragment):
        Manifest.from_dict(_manifest(folder, cascade, **fields))


def test_given_a_schema_3_manifest_when_read_then_it_has_no_cascade(cascade_folder) -> None:
    folder, _, _ = cascade_folder
    assert Manifest.from_dict(_manifest(folder, {"file": "fallback.onnx", "margin": 0.3}, schema=3)).cascade is None


def test_given_a_cascade_when_memory_is_estimated_then_only_model_onnx_counts_once_per_session(cascade_folder) -> None:
    from quantfn.registry import estimate_memory_bytes

    folder, _, _ = cascade_folder
    manifest = Manifest.read(folder)
    one, two = estimate_memory_bytes(manifest, sessions=1), estimate_memory_bytes(manifest, sessions=2)
    # a second session of model.onnx under parallelism "auto"; the second graph keeps its single session
    assert two - one == 2 * manifest.files["model.onnx"].size
    assert one > 2 * (manifest.files["model.onnx"].size + manifest.files["fallback.onnx"].size)
