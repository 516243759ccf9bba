"""Bring your own model: tiny random checkpoints made by transformers, exported by the pipeline, equal to torch.

Each architecture path (the BERT writer with and without a classification head,
MPNet through torch.onnx, an ONNX file passed through, a scikit-learn head) is
built from a Hugging Face folder written here, opened as the runtime opens it,
and compared with torch on the same tokens. Seconds, not minutes: 2 layers of 32.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from quantfn.modelbuild import BuildError, Gate  # noqa: E402
from quantfn.modelbuild.architectures import plan_build  # noqa: E402
from quantfn.modelbuild.pipeline import build_model  # noqa: E402
from quantfn.modelbuild.source import locate_source, read_hf_folder, read_onnx_file  # noqa: E402
from quantfn.models.manifest import Manifest, verify_folder  # noqa: E402

TEXTS = ["a short one", "the quick brown fox jumps over the lazy dog", "Lambda cold starts, measured twice.", "x"]
PAIRS = [("what is a fox", "the quick brown fox"), ("cold start", "a long text about dogs and cats"), ("a", "b")]
TINY = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}
CORPUS = 96  # texts of the fidelity corpus each tiny build is evaluated on (the real builds use all 600)
# Random weights in 32 dimensions: the quantized tiny model is held to what int8 can promise there.
TINY_GATE = Gate(
    task_retention=0.98, cosine_mean=0.99, recall_at_5=None, batch_invariance_min_cosine=0.999, max_size_ratio=None
)


# Every build runs the task-quality suite against its fp32 original: small fake wheels, no download.
pytestmark = pytest.mark.usefixtures("quality_data")


def _hf_folder(root: Path, name: str, model) -> Path:
    folder = root / name
    model.eval()
    model.save_pretrained(folder)
    shutil.copy(locate_source().tokenizer, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    bert = transformers.BertConfig(**TINY)
    labels = {"num_labels": 3, "id2label": {0: "neg", 1: "neutral", 2: "pos"}}
    return {
        "bert": _hf_folder(root, "bert", transformers.BertModel(bert, add_pooling_layer=False)),
        "classifier": _hf_folder(
            root, "classifier", transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, **labels))
        ),
        "cross-encoder": _hf_folder(
            root,
            "cross-encoder",
            transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=1)),
        ),
        "mpnet": _hf_folder(
            root,
            "mpnet",
            transformers.MPNetModel(
                transformers.MPNetConfig(**{**TINY, "max_position_embeddings": 514}), add_pooling_layer=False
            ),
        ),
    }


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _build(out: Path, folder: Path, recipe: str = "fp32", **overrides) -> tuple[Path, Manifest]:
    source = read_hf_folder(folder)
    plan = plan_build(source, model_id=f"tiny-{folder.name}", **overrides)
    build_model(out, source, plan, recipe=recipe, gate=TINY_GATE if recipe != "fp32" else None, corpus_size=CORPUS)
    built = out / plan.model_id
    manifest = Manifest.read(built)
    verify_folder(built, manifest)
    return built, manifest


def _run(folder: Path, manifest: Manifest, items: list) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Tokenize with the folder's own tokenizer.json and run the graph as the runtime opens it."""
    from tokenizers import Tokenizer

    from quantfn.models.session import open_session

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encodings = tokenizer.encode_batch(items)
    arrays = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }
    feed = {name: arrays[name] for name in manifest.inputs}
    session = open_session(folder / "model.onnx", manifest, threads=1)
    return session.run([manifest.output], feed)[0], arrays


def _torch_ids(arrays: dict[str, np.ndarray], folder: Path, built: Path) -> dict[str, np.ndarray]:
    """The same tokens in the checkpoint's own (unpruned) vocabulary: map through the token strings."""
    source_vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    built_vocab = json.loads((built / "tokenizer.json").read_text())["model"]["vocab"]
    to_source = np.zeros(max(built_vocab.values()) + 1, np.int64)
    for token, i in built_vocab.items():
        to_source[i] = source_vocab[token]
    return {**arrays, "input_ids": to_source[arrays["input_ids"]]}


def _torch(model_cls, folder: Path, arrays: dict[str, np.ndarray], **extra):
    model = model_cls.from_pretrained(str(folder), attn_implementation="eager", **extra).eval()
    with torch.no_grad():
        inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
        return model(**inputs)


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def test_given_a_bert_encoder_folder_when_built_then_embeddings_equal_torch(checkpoints, out) -> None:
    built, manifest = _build(out, checkpoints["bert"])
    assert (manifest.task, manifest.architecture, manifest.pooling, manifest.output_kind) == (
        "embed",
        "bert",
        "mean",
        "token_embeddings",
    )
    assert manifest.raw["source"]["kind"] == "hf-folder" and manifest.raw["deploy"]["fits"] == "layer"
    hidden, arrays = _run(built, manifest, TEXTS)
    mask = arrays["attention_mask"]
    ref = _torch(transformers.BertModel, checkpoints["bert"], _torch_ids(arrays, checkpoints["bert"], built))
    want = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(_mean_pool(hidden, mask), _mean_pool(want, mask), atol=1e-4)
    np.testing.assert_allclose(hidden[mask.astype(bool)], want[mask.astype(bool)], atol=1e-4)


def test_given_a_sequence_classifier_when_built_then_labels_and_logits_equal_torch(checkpoints, out) -> None:
    built, manifest = _build(out, checkpoints["classifier"])
    assert manifest.task == "classify" and manifest.labels == ("neg", "neutral", "pos")
    assert manifest.scoring == "softmax" and manifest.inputs == ("input_ids", "attention_mask")
    logits, arrays = _run(built, manifest, TEXTS)
    ids = _torch_ids(arrays, checkpoints["classifier"], built)
    ids.pop("token_type_ids")
    want = _torch(transformers.BertForSequenceClassification, checkpoints["classifier"], ids).logits.numpy()
    assert logits.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(logits, want, atol=1e-4)


def test_given_the_cascade_recipe_when_a_classifier_is_built_then_its_near_ties_are_answered_by_the_second_graph(
    checkpoints, tmp_path: Path
) -> None:
    from quantfn.models.session import open_session
    from quantfn.tasks import open_pipeline
    from quantfn.tasks.classify import near_ties

    built, manifest = _build(tmp_path, checkpoints["classifier"], recipe="int8-cascade")
    cascade, record = manifest.cascade, manifest.raw["cascade"]
    assert manifest.schema == 4 and cascade is not None and cascade.file == "fallback.onnx"
    assert {"fallback.onnx", "fallback.weights.bin"} <= set(manifest.files) and "weights.bin" not in manifest.files
    assert record["recipe"] == "int8-weight" and cascade.session.dequantize_at_load is not None
    assert cascade.margin > 0 and record["calibration"]["texts"] > 0
    assert manifest.raw["fidelity"]["top1_agreement"] >= 0.99

    texts = [f"{a} {b} {c}" for a in ("cold", "the fox", "tax") for b in ("starts", "is", "runs") for c in TEXTS]
    first = open_session(built / "model.onnx", manifest, threads=1)
    second = open_session(built / cascade.file, manifest, threads=1, session=cascade.session)

    def alone(session, text: str) -> np.ndarray:  # one text, no padding: the graph's own answer
        feed = {name: array for name, array in _run(built, manifest, [text])[1].items() if name in manifest.inputs}
        return session.run([manifest.output], feed)[0][0]

    main = np.stack([alone(first, text) for text in texts])
    # A random tiny head barely depends on its input (every gap near the same value): serve it with its
    # margin at the median gap, so that the runtime sends half of these texts to each graph.
    top = np.sort(main, axis=1)
    gaps = top[:, -1] - top[:, -2]
    served = dataclasses.replace(manifest, cascade=dataclasses.replace(cascade, margin=float(np.median(gaps))))
    tied = near_ties(main, "softmax", served.cascade.margin)
    assert tied.any() and not tied.all()  # both graphs answer some of these
    want = np.where(tied[:, None], np.stack([alone(second, text) for text in texts]), main)
    assert np.abs(want - main).max() > 1e-4  # the two graphs' answers are told apart at the tolerance below
    got = open_pipeline(built, served, threads=2).classify(texts, raw_scores=True)
    clear = np.abs(gaps - served.cascade.margin) > 1e-5  # not on the margin's edge (float noise)
    np.testing.assert_allclose(got[clear], want[clear], atol=1e-5)


def test_given_a_one_logit_cross_encoder_when_built_then_pair_scores_equal_torch(checkpoints, out) -> None:
    built, manifest = _build(out, checkpoints["cross-encoder"])
    assert manifest.task == "rerank" and manifest.pair and manifest.scoring == "sigmoid"
    assert manifest.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert manifest.raw["tokenizer"]["pair_template"] == "[CLS] $A [SEP] $B [SEP]"
    logits, arrays = _run(built, manifest, PAIRS)
    assert arrays["token_type_ids"].any()  # the second segment really is type 1
    ids = _torch_ids(arrays, checkpoints["cross-encoder"], built)
    want = _torch(transformers.BertForSequenceClassification, checkpoints["cross-encoder"], ids).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4)


def test_given_an_mpnet_folder_when_built_then_embeddings_equal_torch(checkpoints, out) -> None:
    built, manifest = _build(out, checkpoints["mpnet"], pooling="cls")
    assert manifest.architecture == "mpnet" and manifest.pooling == "cls"
    assert (
        manifest.raw["tokenizer"]["pad_id"] == json.loads((built / "tokenizer.json").read_text())["padding"]["pad_id"]
    )
    hidden, arrays = _run(built, manifest, TEXTS)
    arrays.pop("token_type_ids")
    want = _torch(transformers.MPNetModel, checkpoints["mpnet"], arrays, add_pooling_layer=False).last_hidden_state
    mask = arrays["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[mask], want.numpy()[mask], atol=1e-4)


def _cosine_to_torch_bert(built: Path, manifest: Manifest, checkpoint: Path) -> np.ndarray:
    """Per text, cosine of the built model's mean-pooled embedding with torch's on the same tokens."""
    hidden, arrays = _run(built, manifest, TEXTS)
    ref = _torch(transformers.BertModel, checkpoint, _torch_ids(arrays, checkpoint, built))
    got = _mean_pool(hidden, arrays["attention_mask"])
    want = _mean_pool(ref.last_hidden_state.numpy(), arrays["attention_mask"])
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_given_the_default_recipe_when_a_tiny_encoder_is_quantized_then_its_first_rung_passes_and_stays_close(
    checkpoints, tmp_path: Path
) -> None:
    built, manifest = _build(tmp_path, checkpoints["bert"], recipe="default")
    assert manifest.raw["quantization"]["recipe"] == "int8-static" and manifest.raw["quantization"]["rejected"] == []
    assert _cosine_to_torch_bert(built, manifest, checkpoints["bert"]).min() > 0.99


def test_given_the_static_recipe_when_a_tiny_encoder_is_quantized_then_only_the_gelu_outputs_get_per_token_scales(
    checkpoints, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    built, manifest = _build(tmp_path, checkpoints["bert"], recipe="int8-static")
    graph = onnx.load(str(built / "model.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    kernels = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(kernels) == 8  # 4 projections x 2 layers
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    static = [q for q in quantizers if q.input[1] in inits]
    # qkv, attn_out, ffn_in of both layers: one calibrated scalar scale each; ffn_out (after GELU): per token
    assert len(static) == 6 and all(inits[q.input[1]].size == 1 for q in static)
    dynamic = [q for q in quantizers if q.input[1] not in inits]

    def source(name: str) -> str:  # past the smoothing Mul and the shift above GELU's floor
        node = producer[name]
        return source(node.input[0]) if node.op_type in ("Mul", "Add") else node.op_type

    assert len(dynamic) == 2 and all(source(q.input[0]) == "Gelu" and len(q.input) == 2 for q in dynamic)
    # qkv, attn_out and ffn_in carry their bias inside the kernel; the attention op adds none of its own
    assert sum(len(k.input) == 7 and k.input[6] in inits for k in kernels) == 6
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 2 and all(not n.input[3] for n in attention)
    # GELU's output is never below its floor: a per-token max of the shifted input, no Abs
    assert sum(n.op_type == "ReduceMax" for n in graph.node) == 2 and not any(n.op_type == "Abs" for n in graph.node)
    assert manifest.raw["fidelity"]["batch_invariance_min_cosine"] >= 0.9999
    assert _cosine_to_torch_bert(built, manifest, checkpoints["bert"]).min() > 0.99


def test_given_the_per_token_recipe_when_a_tiny_encoder_is_quantized_then_it_computes_in_int8_and_stays_close(
    checkpoints, tmp_path: Path
) -> None:
    import onnx

    built, manifest = _build(tmp_path, checkpoints["bert"], recipe="int8-token7")
    graph = onnx.load(str(built / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in graph.node) == 8  # 4 projections x 2 layers
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    # the output projections' SmoothQuant factors were folded into the value columns (no Mul between)
    assert sum(producer[q.input[0]].op_type == "MultiHeadAttention" for q in quantizers) == 2
    # one shared per-token zero point; ffn_out's codes start at GELU's floor (zero point 0, none given)
    assert len({q.input[2] for q in quantizers if len(q.input) > 2}) == 1
    assert sum(len(q.input) == 2 for q in quantizers) == 2
    assert sum(n.op_type == "Gelu" for n in graph.node) == 2 and not any(n.op_type == "BiasGelu" for n in graph.node)
    assert _cosine_to_torch_bert(built, manifest, checkpoints["bert"]).min() > 0.99


def test_given_the_weight_only_recipe_when_a_tiny_encoder_is_quantized_then_it_loads_and_stays_close(
    checkpoints, tmp_path: Path
) -> None:
    built, manifest = _build(tmp_path, checkpoints["bert"], recipe="int8-weight")
    assert manifest.dequantize_at_load is not None and "weights.bin" in manifest.files
    assert manifest.raw["quantization"]["vocabulary_pruned_rows"] > 0
    quality = manifest.raw["quality"]  # the task-quality gate ran against the fp32 original
    assert set(quality["tasks"]) == {"lee", "rotten_tomatoes"} and quality["retention_min"] >= TINY_GATE.task_retention
    assert _cosine_to_torch_bert(built, manifest, checkpoints["bert"]).min() > 0.99


def test_given_an_onnx_file_whose_output_size_is_symbolic_when_planned_then_a_probe_finds_it(
    checkpoints, out, tmp_path
) -> None:
    import onnx

    built, _ = _build(out, checkpoints["bert"])
    model = onnx.load(str(built / "model.onnx"))
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_param = "hidden"  # as many exporters write it
    onnx.save_model(model, str(tmp_path / "symbolic.onnx"))
    plan = plan_build(read_onnx_file(tmp_path / "symbolic.onnx", checkpoints["bert"] / "tokenizer.json"))
    # was 0: the embedding ranges of a 0-wide model then made the published manifest invalid (`make models`)
    assert plan.dimensions == TINY["hidden_size"]


def test_given_an_onnx_file_and_its_tokenizer_when_built_then_it_passes_through(checkpoints, out, tmp_path) -> None:
    built, _ = _build(out, checkpoints["bert"])
    user_onnx = tmp_path / "mine.onnx"
    shutil.copy(built / "model.onnx", user_onnx)
    source = read_onnx_file(user_onnx, checkpoints["bert"] / "tokenizer.json")
    plan = plan_build(source, model_id="tiny-onnx", normalize=True)
    assert plan.architecture == "onnx" and plan.output_kind == "token_embeddings"
    build_model(
        out,
        source,
        plan,
        recipe="int8-dynamic",
        gate=Gate(
            task_retention=0.98,
            cosine_mean=0.98,
            cosine_min=None,
            batch_invariance_min_cosine=None,
            max_size_ratio=None,
        ),
        corpus_size=CORPUS,
    )
    manifest = Manifest.read(out / "tiny-onnx")
    assert manifest.raw["source"]["kind"] == "onnx" and manifest.normalize
    hidden, arrays = _run(out / "tiny-onnx", manifest, TEXTS)
    assert hidden.shape[:2] == arrays["input_ids"].shape


def test_given_a_sklearn_head_on_an_encoder_when_built_then_decisions_match_sklearn(checkpoints, out, tmp_path) -> None:
    joblib = pytest.importorskip("joblib")
    linear_model = pytest.importorskip("sklearn.linear_model")
    built, manifest = _build(out, checkpoints["bert"], normalize=True)
    hidden, arrays = _run(built, manifest, TEXTS * 3)
    pooled = _mean_pool(hidden, arrays["attention_mask"])
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    head = linear_model.LogisticRegression(max_iter=500).fit(pooled, ["a", "b", "c", "d"] * 3)
    joblib.dump(head, tmp_path / "head.joblib")
    joblib.dump({"a": "alpha", "b": "beta", "c": "gamma", "d": "delta"}, tmp_path / "labels.joblib")
    source = read_hf_folder(checkpoints["bert"])
    plan = plan_build(
        source,
        model_id="tiny-intent",
        normalize=True,
        sklearn_head=tmp_path / "head.joblib",
        label_map=tmp_path / "labels.joblib",
    )
    build_model(out, source, plan, recipe="fp32", corpus_size=CORPUS)
    manifest = Manifest.read(out / "tiny-intent")
    assert manifest.task == "classify" and manifest.labels == ("alpha", "beta", "gamma", "delta")
    assert manifest.raw["quality"]["tasks"]["intent"]["retention"] == 1.0  # fp32 against its own original
    logits, _ = _run(out / "tiny-intent", manifest, TEXTS * 3)
    np.testing.assert_allclose(logits, head.decision_function(pooled), atol=1e-4)


def test_given_an_unsupported_architecture_when_planned_then_the_refusal_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "model.safetensors").write_bytes(b"")
    shutil.copy(locate_source().tokenizer, folder / "tokenizer.json")
    with pytest.raises(BuildError, match=r"GPT2LMHeadModel.*gpt2.*unsupported"):
        plan_build(read_hf_folder(folder))


def test_given_a_folder_without_tokenizer_json_when_read_then_the_refusal_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(BuildError, match=r"no tokenizer\.json"):
        read_hf_folder(tmp_path)


def test_given_a_tokenizer_of_another_vocabulary_when_an_onnx_file_is_planned_then_it_is_refused(
    checkpoints, out, tmp_path: Path
) -> None:
    built, _ = _build(out, checkpoints["bert"])
    data = json.loads((checkpoints["bert"] / "tokenizer.json").read_text())
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < 30000}  # another, smaller one
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match="30522 rows but the tokenizer has 30000 tokens"):
        plan_build(read_onnx_file(built / "model.onnx", tmp_path / "tokenizer.json"))


def test_given_a_built_cross_encoder_when_served_then_rerank_scores_are_torchs_sigmoid(
    checkpoints, out, monkeypatch: pytest.MonkeyPatch, lambda_context
) -> None:
    from functions.api.app import lambda_handler
    from quantfn.registry import reset_registry
    from tests.conftest import load_event

    built, _ = _build(out, checkpoints["cross-encoder"])
    monkeypatch.setenv("QUANTFN_MODELS", f"reranker=layer:{built.name}")
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(built.parent))
    reset_registry()
    query, documents = "what is a fox", ["the quick brown fox", "a long text about dogs and cats", "b", "fox"]
    event = load_event("api-rerank.json")
    event["body"] = json.dumps({"model": "reranker", "query": query, "documents": documents})
    try:
        reply = lambda_handler(event, lambda_context)
    finally:
        reset_registry()
    body = json.loads(reply["body"])
    assert reply["statusCode"] == 200, body
    _, arrays = _run(built, Manifest.read(built), [(query, d) for d in documents])
    ids = _torch_ids(arrays, checkpoints["cross-encoder"], built)
    logits = _torch(transformers.BertForSequenceClassification, checkpoints["cross-encoder"], ids).logits.numpy()
    want = 1 / (1 + np.exp(-logits[:, 0]))
    got = {item["index"]: item["relevance_score"] for item in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(documents))], want, atol=1e-4)
    assert [item["index"] for item in body["results"]] == sorted(range(len(documents)), key=lambda i: -want[i])
