"""Build the default model once and check it as a runtime would, independently of the build's own code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantfn.modelbuild import BuildGateError, Gate, build_model
from quantfn.modelbuild.metrics import cosine_stats, recall_at_k
from quantfn.modelbuild.reference import load_corpus, load_reference
from quantfn.models.manifest import Manifest, verify_folder

MODEL_ID = "all-minilm-l6-v2"


# Every build runs the task-quality suite against its fp32 original: small fake wheels, no download.
pytestmark = pytest.mark.usefixtures("quality_data")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, quality_data: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("models")
    manifest = build_model(out)
    return out, manifest


def _session(folder: Path, manifest: Manifest):
    """The session as the runtime opens it (quantfn.models.session), not as the build evaluated it."""
    from quantfn.models.session import open_session

    return open_session(folder / "model.onnx", manifest, threads=2)


def _embed(session, tokenizer, texts: list[str], inputs: tuple[str, ...]) -> np.ndarray:
    """Tokenize, run, mean-pool over the mask, normalise: written here, not imported from the build."""
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    hidden = session.run(["last_hidden_state"], {name: feed[name] for name in inputs})[0]
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def runtime(built: tuple[Path, dict]):
    from tokenizers import Tokenizer

    out, _ = built
    folder = out / MODEL_ID
    manifest = Manifest.read(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return folder, manifest, _session(folder, manifest), tokenizer


def test_manifest_parses_and_every_file_matches_its_sha256(runtime) -> None:
    folder, manifest, _, _ = runtime
    verify_folder(folder, manifest)
    assert set(manifest.files) == {"model.onnx", "tokenizer.json"}
    # default: the first recipe of its ladder that passes; on MiniLM-L6 static W7A8 does, nothing is rejected
    assert manifest.raw["quantization"]["recipe"] == "int8-static"
    assert manifest.raw["quantization"]["rejected"] == [] and "int8-weight" in manifest.raw["quantization"]["chosen_by"]
    assert manifest.task == "embed" and manifest.dimensions == 384 and manifest.max_sequence_length == 256
    assert manifest.inputs == ("input_ids", "attention_mask") and manifest.output == "last_hidden_state"
    assert manifest.raw["source"]["upstream"] == "sentence-transformers/all-MiniLM-L6-v2"
    corpora = manifest.raw["corpora"]
    assert manifest.raw["fidelity"]["sentences"] == corpora["gate"]["size"] == 300  # the tests' small gate corpus
    assert corpora["calibration"]["sha256"] != corpora["gate"]["sha256"] and len(corpora["gate"]["sha256"]) == 64
    assert manifest.raw["fidelity"]["cosine_p1"] >= manifest.raw["fidelity"]["gate"]["cosine_p1"] == 0.995
    quality = manifest.raw["quality"]
    assert set(quality["tasks"]) == {"lee", "rotten_tomatoes"}
    assert quality["retention_min"] >= manifest.raw["fidelity"]["gate"]["task_retention"] == 0.995


def test_model_is_at_most_a_quarter_of_the_fp32_graph(built) -> None:
    out, manifest = built
    fp32 = [p for p in (out / ".work").glob("fp32-*.onnx") if "-vocab" not in p.name]
    assert len(fp32) == 1
    shipped = (out / MODEL_ID / "model.onnx").stat().st_size
    ratio = shipped / fp32[0].stat().st_size
    assert ratio <= 0.25
    assert manifest["size_ratio_vs_fp32"] == pytest.approx(ratio, abs=1e-4)


def test_every_projection_computes_in_int8_with_static_scales_where_activations_are_steady(runtime) -> None:
    import onnx
    from onnx import numpy_helper

    folder, manifest, _, _ = runtime
    model = onnx.load(str(folder / "model.onnx"))
    graph = model.graph
    ops = [node.op_type for node in graph.node]
    # fused attention; the residual LayerNorm stays unfused (SkipLayerNormalization is slower on CPU)
    assert "MultiHeadAttention" in ops and "SkipLayerNormalization" not in ops and "DequantizeLinear" not in ops
    assert manifest.dequantize_at_load is None  # a complete model.onnx
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]  # no fp32 projection left
    products = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(products) == 24
    for node in products:
        weight = inits[node.input[1]]
        assert weight.dtype == np.int8 and np.abs(weight.astype(int)).max() <= 63  # 7-bit: no 16-bit saturation
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    producer = {o: n for n in graph.node for o in n.output}
    # qkv, attn_out and ffn_in of six layers: one calibrated scale and zero point each (uint8, the whole range)
    static = [q for q in quantizers if q.input[1] in inits]
    assert len(static) == 18 and all(
        inits[q.input[1]].size == 1 and inits[q.input[2]].dtype == np.uint8 for q in static
    )
    # each channel centred and smoothed on its way in, at no pass of its own: the output projection's in the
    # value columns and bias (attention feeds its quantizer), qkv's and ffn_in's by a second LayerNormalization
    assert sum(producer[q.input[0]].op_type == "MultiHeadAttention" for q in static) == 6
    assert sum(producer[q.input[0]].op_type == "LayerNormalization" for q in static) == 12
    # ffn_out (after GELU, outlier tokens): one scale per token over the input above GELU's floor, a blocked
    # QuantizeLinear (opset 21), one block per row, zero point 0 (no zero-point input, no Abs)
    per_token = [q for q in quantizers if q.input[1] not in inits]
    assert len(per_token) == 6 and all(any(a.name == "block_size" for a in q.attribute) for q in per_token)
    assert all(len(q.input) == 2 for q in per_token) and "Expand" not in ops
    assert ops.count("Abs") == 0 and ops.count("ReduceMax") == 6
    # qkv's, attn_out's and ffn_in's biases ride in the kernel (ffn_out's after its per-token scale): the
    # attention gets q, k, v with their bias added and no bias input of its own
    assert sum(len(n.input) == 7 and n.input[6] in inits for n in products) == 18
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 6 and all(len(n.input) > 3 and not n.input[3] for n in attention)
    # opset 20's Gelu alone, not com.microsoft BiasGelu (slower on CPU)
    assert ops.count("Gelu") == 6 and "BiasGelu" not in ops


def test_tokenizer_truncates_at_256_and_does_not_pad_to_a_fixed_length(runtime) -> None:
    folder, _, _, tokenizer = runtime
    assert len(tokenizer.encode("word " * 1000).ids) == 256
    assert len(tokenizer.encode("short").ids) == 3
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["padding"]["strategy"] == "BatchLongest"


def test_fidelity_recomputed_independently_meets_the_gate(runtime) -> None:
    from quantfn.modelbuild import corpora

    _, manifest, session, tokenizer = runtime
    # the build's gate corpus here is the fidelity corpus's odd lines (tests/corpora_data.py): their stored
    # sentence-transformers vectors are the reference, independent of the build's own fp32 export
    texts, reference = corpora.load()[1].texts, load_reference()[1::2]
    assert texts == load_corpus()[1::2]
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    order = np.argsort([len(t) for t in texts])
    vectors = np.zeros_like(reference)
    for start in range(0, len(texts), 32):
        idx = order[start : start + 32]
        vectors[idx] = _embed(session, tokenizer, [texts[i] for i in idx], manifest.inputs)
    mean, _ = cosine_stats(vectors, reference)
    gate = manifest.raw["fidelity"]["gate"]
    assert mean >= gate["cosine_mean"] >= 0.998
    # recall@5 is reported, not gated: the runtime reproduces the build's figure
    assert recall_at_k(vectors, reference, 5) == pytest.approx(manifest.fidelity["recall_at_5"], abs=2e-3)
    assert mean == pytest.approx(manifest.fidelity["cosine_mean"], abs=1e-5)


def test_a_text_embeds_the_same_alone_and_inside_a_mixed_batch(runtime) -> None:
    _, manifest, session, tokenizer = runtime
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = load_corpus()[100:132]
    together = _embed(session, tokenizer, texts, manifest.inputs)
    alone = np.concatenate([_embed(session, tokenizer, [t], manifest.inputs) for t in texts])
    assert (together * alone).sum(1).min() >= 0.9999


def test_a_failing_gate_raises_and_publishes_nothing(built) -> None:
    out, _ = built
    before = (out / MODEL_ID / "model.onnx").read_bytes()
    entries = sorted(p.name for p in out.iterdir())
    impossible = Gate(cosine_mean=1.01, recall_at_5=None, batch_invariance_min_cosine=None, max_size_ratio=None)
    with pytest.raises(BuildGateError, match="cosine_mean"):
        build_model(out, recipe="fp32", model_id=MODEL_ID, gate=impossible)
    with pytest.raises(BuildGateError):
        build_model(out, recipe="fp32", model_id="never-published", gate=impossible)
    assert sorted(p.name for p in out.iterdir()) == entries
    assert (out / MODEL_ID / "model.onnx").read_bytes() == before


def _served(folder: Path, manifest: Manifest) -> tuple[float, float]:
    """A built folder's session on 96 corpus texts: the lowest cosine of a text alone against inside a batch of
    32, and the mean cosine against the fp32 reference."""
    from tokenizers import Tokenizer

    session = _session(folder, manifest)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    texts, reference = load_corpus()[:96], load_reference()[:96]
    together = _embed(session, tokenizer, texts[:32], manifest.inputs)
    alone = np.concatenate([_embed(session, tokenizer, [t], manifest.inputs) for t in texts[:32]])
    vectors = np.concatenate([_embed(session, tokenizer, texts[i : i + 32], manifest.inputs) for i in (0, 32, 64)])
    return float((together * alone).sum(1).min()), cosine_stats(vectors, reference)[0]


def test_mixed_recipe_meets_the_default_gate_and_loads_through_the_runtime(built) -> None:
    """int8-mixed: W8A8 in twelve projections, weight-only in the rest; its int8 weights dequantized at load."""
    out, _ = built
    data = build_model(out, recipe="int8-mixed")  # raises BuildGateError below the default's gate
    folder = out / data["model_id"]
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)
    assert manifest.dequantize_at_load is not None and len(manifest.dequantize_at_load.tensors) == 13
    assert manifest.raw["fidelity"]["gate"] == Gate().as_dict()
    invariance, mean = _served(folder, manifest)
    assert invariance >= 0.9999 and mean >= 0.999


def test_steady_recipe_runs_int8_where_the_range_is_steady_and_weight_only_after_gelu(built) -> None:
    """int8-steady: static W7A8 in qkv, attn_out and ffn_in (18 projections), weight-only ffn_out (6), no per-token
    ops; held to the default's gate and batch invariant."""
    import onnx

    out, _ = built
    data = build_model(out, recipe="int8-steady")  # raises BuildGateError below the default's gate
    folder = out / data["model_id"]
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)
    assert manifest.raw["fidelity"]["gate"] == Gate().as_dict()
    ops = [node.op_type for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 18 and "ReduceMax" not in ops
    spec = manifest.dequantize_at_load
    assert spec is not None and len(spec.tensors) == 7  # six ffn_out weights + the position table
    invariance, mean = _served(folder, manifest)
    assert invariance >= 0.9999 and mean >= 0.998


def test_weight_only_recipe_ships_int8_weights_rebuilt_to_fp32_at_load(built) -> None:
    """int8-weight (the default's fallback): every projection's int8 weights in weights.bin, fp32 compute."""
    import onnx

    out, _ = built
    data = build_model(out, recipe="int8-weight")
    folder = out / data["model_id"]
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)
    assert set(manifest.files) == {"model.onnx", "tokenizer.json", "weights.bin"}
    assert "chosen_by" not in manifest.raw["quantization"]  # asked for by name
    spec = manifest.dequantize_at_load
    assert manifest.pre_optimized and spec is not None and len(spec.tensors) == 25  # 24 projections + positions
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    stubs = {init.name for init in graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL}
    assert stubs == {tensor.name for tensor in spec.tensors}
    assert all(tensor.q.dtype == "int8" for tensor in spec.tensors)
    # measured on the held-out half only (the tests' gate corpus): recall@5 over 300 texts, not 600
    assert manifest.fidelity["recall_at_5"] >= 0.975 and manifest.fidelity["cosine_mean"] >= 0.9998
