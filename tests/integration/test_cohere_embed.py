"""Embeddings by type through the real clients: cohere.Client (/v1/embed), cohere.ClientV2 (/v2/embed) and openai's
``dimensions``, against ``quantfn serve`` on loopback; every type checked against the model's own float vectors and
the manifest's calibrated ranges."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline
from quantfn.tasks.embed import matryoshka, quantize_uint8
from tests.conftest import (
    DEFAULT_MODEL_ID,
    MATRYOSHKA_MODEL_ID,
    NO_RANGES_MODEL_ID,
    PROMPTED_MODEL_ID,
    typed_models_env,
)
from tests.integration.local_api import local_api

cohere = pytest.importorskip("cohere")
TEXTS = ["Paris is the capital of France.", "Bananas are rich in potassium.", "int8 keeps 99 % of recall"]
ALL_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


@pytest.fixture(scope="module")
def api(typed_models_root: Path) -> Iterator[str]:
    with local_api({**typed_models_env(typed_models_root), "QUANTFN_THREADS": "2"}) as url:
        yield url


@pytest.fixture(scope="module")
def model(typed_models_root: Path):
    """The default model (with its ranges) in this process: the float vectors every type is made from."""
    folder = typed_models_root / DEFAULT_MODEL_ID
    manifest = Manifest.read(folder)
    return open_pipeline(folder, manifest, threads=2), manifest


def expected_types(vectors: np.ndarray, manifest: Manifest) -> dict[str, np.ndarray]:
    codes = quantize_uint8(vectors, *manifest.embedding_ranges[vectors.shape[1]])
    bits = np.packbits(vectors > 0, axis=1)
    return {"uint8": codes, "int8": codes.astype(int) - 128, "ubinary": bits, "binary": bits.astype(int) - 128}


def test_client_v2_gets_every_type_in_cohere_layouts(api: str, model) -> None:
    pipeline, manifest = model
    client = cohere.ClientV2(api_key="unused", base_url=api)
    # When ClientV2.embed asks for all six types
    reply = client.embed(model="all-MiniLM-L6-v2", texts=TEXTS, input_type="search_document", embedding_types=ALL_TYPES)
    floats = pipeline.embed(TEXTS)
    expected = expected_types(floats, manifest)
    got = reply.embeddings
    # Then float is the model's own vector, base64 its little-endian float32 bytes
    assert np.sum(np.asarray(got.float_, np.float32) * floats, axis=1).min() >= 0.9999
    decoded = np.stack([np.frombuffer(base64.b64decode(s), "<f4") for s in got.base64])
    np.testing.assert_array_equal(decoded, np.asarray(got.float_, np.float32))
    # And the four integer types are exactly packbits(x > 0) (less 128 when signed) and the calibrated codes
    for kind in ("int8", "uint8", "binary", "ubinary"):
        np.testing.assert_array_equal(np.asarray(getattr(got, kind)), expected[kind], err_msg=kind)
    assert np.asarray(got.ubinary).shape == (3, 48) and np.asarray(got.int8).shape == (3, 384)
    assert min(map(min, got.int8)) >= -128 and max(map(max, got.uint8)) <= 255
    assert reply.texts == TEXTS
    assert reply.meta.api_version.version == "2" and reply.meta.billed_units.input_tokens > 0


def test_client_v1_floats_and_by_type(api: str, model) -> None:
    pipeline, manifest = model
    client = cohere.Client(api_key="unused", base_url=api)
    floats = pipeline.embed(TEXTS)
    # Given no embedding_types, v1 answers Cohere's embeddings_floats shape
    plain = client.embed(texts=TEXTS, model="all-MiniLM-L6-v2")
    assert plain.response_type == "embeddings_floats"
    assert np.sum(np.asarray(plain.embeddings, np.float32) * floats, axis=1).min() >= 0.9999
    # And with types, embeddings_by_type with the same codes v2 gives
    typed = client.embed(
        texts=TEXTS, model="all-MiniLM-L6-v2", input_type="search_query", embedding_types=["int8", "ubinary"]
    )
    assert typed.response_type == "embeddings_by_type"
    expected = expected_types(floats, manifest)
    np.testing.assert_array_equal(np.asarray(typed.embeddings.int8), expected["int8"])
    np.testing.assert_array_equal(np.asarray(typed.embeddings.ubinary), expected["ubinary"])
    # cohere.Client's batching merge (cohere 7.3) drops the float type (it rebuilds the model by field name, not by
    # its alias "float"); the reply has it, and a call with batching=False reads it
    unbatched = client.embed(texts=TEXTS, model="all-MiniLM-L6-v2", embedding_types=["float"], batching=False)
    assert np.sum(np.asarray(unbatched.embeddings.float_, np.float32) * floats, axis=1).min() >= 0.9999
    assert typed.meta.api_version.version == "1"


def test_the_same_text_gets_the_same_codes_alone_and_in_a_batch(api: str) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=api)
    alone = client.embed(model="all-MiniLM-L6-v2", texts=TEXTS[:1], input_type="search_query", embedding_types=["int8"])
    together = client.embed(model="all-MiniLM-L6-v2", texts=TEXTS, input_type="search_query", embedding_types=["int8"])
    assert alone.embeddings.int8[0] == together.embeddings.int8[0]


def test_output_dimension_on_a_matryoshka_model_is_truncated_renormalised_and_quantized_at_that_size(
    api: str, model, typed_models_root: Path
) -> None:
    pipeline, _ = model
    manifest = Manifest.read(typed_models_root / MATRYOSHKA_MODEL_ID)
    client = cohere.ClientV2(api_key="unused", base_url=api)
    reply = client.embed(
        model=MATRYOSHKA_MODEL_ID,
        texts=TEXTS,
        input_type="clustering",
        output_dimension=128,
        embedding_types=["float", "uint8", "ubinary"],
    )
    short = matryoshka(pipeline.embed(TEXTS), 128, True)
    got = np.asarray(reply.embeddings.float_, np.float32)
    assert got.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.sum(got * short, axis=1).min() >= 0.9999
    np.testing.assert_array_equal(
        np.asarray(reply.embeddings.uint8), quantize_uint8(short, *manifest.embedding_ranges[128])
    )
    assert np.asarray(reply.embeddings.ubinary).shape == (3, 16)


def test_openai_dimensions_follow_the_same_rule(api: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    short = client.embeddings.create(model=MATRYOSHKA_MODEL_ID, input=TEXTS, dimensions=64)
    vectors = np.asarray([item.embedding for item in short.data], np.float32)
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # A model that does not declare Matryoshka training keeps today's 400, naming the field
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, dimensions=64)
    assert refused.value.body["param"] == "dimensions" and "not trained to shorten" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MATRYOSHKA_MODEL_ID, input=TEXTS, dimensions=100)


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"model": NO_RANGES_MODEL_ID, "embedding_types": ["int8"]}, "embedding_types", "no calibrated int8 ranges"),
        ({"model": DEFAULT_MODEL_ID, "output_dimension": 128}, "output_dimension", "not trained to shorten"),
        ({"model": MATRYOSHKA_MODEL_ID, "output_dimension": 100}, "output_dimension", "256, 128, 64"),
        ({"model": DEFAULT_MODEL_ID, "embedding_types": ["int4"]}, "embedding_types[0]", "must be one of"),
        ({"model": DEFAULT_MODEL_ID, "texts": ["word " * 400], "truncate": "NONE"}, "texts[0]", "reads at most 256"),
        ({"model": DEFAULT_MODEL_ID, "texts": ["fine", "\u200b\u200b"]}, "texts[1]", "nothing the model can read"),
    ],
)
def test_client_v2_gets_a_400_naming_the_field(api: str, kwargs: dict, param: str, words: str) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=api)
    with pytest.raises(cohere.BadRequestError) as refused:
        client.embed(**{"texts": TEXTS, "input_type": "search_query", **kwargs})
    error = refused.value.body["error"]
    assert error["param"] == param and words in error["message"]


def test_a_model_without_ranges_still_gives_binary(api: str, model) -> None:
    pipeline, _ = model
    client = cohere.ClientV2(api_key="unused", base_url=api)
    reply = client.embed(model=NO_RANGES_MODEL_ID, texts=TEXTS, input_type="search_query", embedding_types=["ubinary"])
    np.testing.assert_array_equal(np.asarray(reply.embeddings.ubinary), np.packbits(pipeline.embed(TEXTS) > 0, axis=1))


def test_truncate_start_and_end_keep_the_other_side_of_a_long_text(api: str, model) -> None:
    pipeline, _ = model
    client = cohere.ClientV2(api_key="unused", base_url=api)
    text = "The opening is about cats. " + "filler words fill the middle here. " * 60 + "The ending is about ships."
    kinds = {}
    for side in ("START", "END"):
        reply = client.embed(
            model="all-MiniLM-L6-v2", texts=[text], input_type="search_query", embedding_types=["float"], truncate=side
        )
        kinds[side] = np.asarray(reply.embeddings.float_[0], np.float32)
    cats, ships = pipeline.embed(["The opening is about cats.", "The ending is about ships."])
    # END keeps the start (cats), START keeps the end (ships)
    assert kinds["END"] @ cats > kinds["START"] @ cats
    assert kinds["START"] @ ships > kinds["END"] @ ships
    # And END is exactly what the model's own truncation gives
    assert kinds["END"] @ pipeline.embed([text])[0] >= 0.9999


def test_input_types_map_to_the_models_prompts(api: str, typed_models_root: Path) -> None:
    folder = typed_models_root / PROMPTED_MODEL_ID
    pipeline = open_pipeline(folder, Manifest.read(folder), threads=1)
    client = cohere.ClientV2(api_key="unused", base_url=api)
    for input_type, prefix in [
        ("search_query", "query: "),
        ("search_document", "passage: "),
        ("classification", "query: "),
    ]:
        reply = client.embed(model=PROMPTED_MODEL_ID, texts=TEXTS[:1], input_type=input_type, embedding_types=["float"])
        expected = pipeline.embed([prefix + TEXTS[0]])[0]
        assert np.asarray(reply.embeddings.float_[0], np.float32) @ expected >= 0.9999, input_type
