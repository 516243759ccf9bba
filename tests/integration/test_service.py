"""The runtime path (registry -> store -> session -> tokenize -> pool, through inference.run) against the stored
fp32 reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantfn.config import LimitSettings, RuntimeSettings, Settings
from quantfn.errors import ModelNotFound, TooLarge
from quantfn.inference import Result, run
from quantfn.modelbuild.metrics import cosine_stats, recall_at_k
from quantfn.modelbuild.reference import load_corpus, load_reference
from quantfn.registry import Registry
from quantfn.tasks import EmbedRequest
from tests.conftest import DEFAULT_MODEL_ID, load_event

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def service(models_root: Path) -> Registry:
    # max_inputs: the fidelity gate embeds the whole 600-text corpus in one call
    return Registry(
        Settings(
            runtime=RuntimeSettings(
                models=((DEFAULT_MODEL_ID, f"layer:{DEFAULT_MODEL_ID}"),), models_root=models_root, threads=2
            ),
            limits=LimitSettings(max_inputs=1000),
        )
    )


def embed(registry: Registry, texts: list[str], model: str = MODEL) -> Result:
    return run(EmbedRequest(texts, model), registry=registry)


def test_runtime_embeddings_meet_the_gate_against_the_stored_fp32_reference(
    service: Registry, models_root: Path
) -> None:
    corpus, reference = load_corpus(), load_reference()
    vectors = embed(service, corpus, MODEL).output
    mean, minimum = cosine_stats(vectors, reference)
    build = json.loads((models_root / DEFAULT_MODEL_ID / "manifest.json").read_text(encoding="utf-8"))["fidelity"]
    # The build gated the gate corpus against its fp32 export; the fidelity corpus (never fitted to either) against
    # sentence-transformers through the runtime path is held to the same worst-case gate.
    assert mean >= build["gate"]["cosine_mean"] >= 0.998 and minimum >= build["gate"]["cosine_min"], (mean, minimum)
    assert np.percentile((vectors * reference).sum(axis=1), 1) >= build["gate"]["cosine_p1"]
    assert recall_at_k(vectors, reference, k=5) >= 0.9


def test_an_embedding_does_not_depend_on_the_rest_of_the_batch(service: Registry) -> None:
    corpus = load_corpus()
    batch = [*corpus[:31], "A short one."]
    together = embed(service, batch, MODEL).output
    for index in (0, 7, 31):
        alone = embed(service, [batch[index]], MODEL).output[0]
        assert float(alone @ together[index]) >= 0.9999


def test_results_come_back_in_request_order(service: Registry) -> None:
    texts = ["word " * 60, "tiny", "a sentence of middling length here"]
    together = embed(service, texts, MODEL).output
    for index, text in enumerate(texts):
        np.testing.assert_allclose(together[index], embed(service, [text], MODEL).output[0], atol=2e-3)


def test_long_inputs_are_truncated_to_the_models_maximum(service: Registry) -> None:
    long_text = "The quick brown fox jumps over the lazy dog. " * 60
    result = embed(service, [long_text, long_text + " and then some more words at the end"], MODEL)
    assert min(result.token_counts) > 256  # usage reports what was sent
    assert float(result.output[0] @ result.output[1]) > 0.99999  # the tail past 256 tokens is cut


def test_paraphrases_are_closer_than_unrelated_sentences(service: Registry) -> None:
    a, b, c = embed(
        service, ["A man plays the guitar.", "Someone is playing a guitar.", "Stocks fell today."], MODEL
    ).output
    assert a @ b > 0.6 > a @ c


def test_token_limits_are_413_naming_the_input(models_root: Path) -> None:
    small = Registry(
        Settings(
            runtime=RuntimeSettings(models_root=models_root),
            limits=LimitSettings(max_input_tokens=8, max_total_tokens=12),
        )
    )
    with pytest.raises(TooLarge, match="QUANTFN_MAX_INPUT_TOKENS") as caught:
        embed(small, ["short", "this one has far too many tokens for the limit"])
    assert caught.value.code == "input_too_long" and "'input[1]'" in caught.value.message
    with pytest.raises(TooLarge, match="QUANTFN_MAX_TOTAL_TOKENS"):
        embed(small, ["one two three four five", "six seven eight nine ten"])  # 7 + 7 > 12
    assert not small.default.loaded  # the tokenizer alone decided


def test_unknown_model_is_refused_without_loading_the_session(models_root: Path) -> None:
    registry = Registry(Settings(runtime=RuntimeSettings(models_root=models_root)))
    with pytest.raises(ModelNotFound):
        embed(registry, ["hello"], "text-embedding-3-small")
    assert not registry.default.loaded


def test_model_missing_from_the_layer_is_a_503_with_a_fixed_body(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lambda_context
) -> None:
    from functions.api.app import lambda_handler
    from quantfn.registry import reset_registry

    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(tmp_path / "empty"))
    reset_registry()
    try:
        reply = lambda_handler(load_event("api-embeddings.json"), lambda_context)
    finally:
        reset_registry()
    body = json.loads(reply["body"])
    assert reply["statusCode"] == 503
    assert body["error"]["code"] == "model_unavailable"
    assert str(tmp_path) not in reply["body"]


@pytest.mark.usefixtures("service_env")
def test_no_input_text_reaches_the_logs(capsys: pytest.CaptureFixture[str], lambda_context) -> None:
    from functions.api.app import lambda_handler

    secret = "Zanzibar-7734 is my password"
    event = load_event("api-embeddings.json")
    event["body"] = json.dumps({"model": MODEL, "input": [secret]})
    assert lambda_handler(event, lambda_context)["statusCode"] == 200
    event["body"] = json.dumps({"model": MODEL, "input": [secret, 5]})
    assert lambda_handler(event, lambda_context)["statusCode"] == 400
    captured = capsys.readouterr()
    assert "Zanzibar" not in captured.out + captured.err
    assert '"InferenceMs"' in captured.out  # the EMF metrics did get written
