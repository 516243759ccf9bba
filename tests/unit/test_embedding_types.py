"""Output types, Matryoshka sizes and the reply-size bound of the embed task, and the Cohere embed parser: pure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantfn.errors import BadRequest, ModelUnavailable
from quantfn.models.manifest import Manifest
from quantfn.serialize import dumps
from quantfn.tasks.embed import (
    EmbedRequest,
    EmbedTask,
    estimate_embedding_bytes,
    matryoshka,
    quantize_uint8,
    texts_json_bytes,
    typed_embeddings,
)
from quantfn.wire.cohere import parse_embed_request

DIMS = 16


def manifest(**extra: object) -> Manifest:
    files = {name: {"sha256": "0" * 64, "size": 1} for name in ("model.onnx", "tokenizer.json")}
    base = {
        "schema": 3,
        "model_id": "m",
        "task": "embed",
        "files": files,
        "dimensions": DIMS,
        "max_sequence_length": 8,
        "inputs": ["input_ids", "attention_mask"],
        "output": "last_hidden_state",
    }
    return Manifest.from_dict(base | extra)


def ranges(size: int, low: float = -0.5, high: float = 0.5) -> dict:
    return {"low": [low] * size, "high": [high] * size}


def unit(rows: int, size: int = DIMS, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, size)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


RANGED = manifest(embedding_ranges={"by_dimensions": {str(DIMS): ranges(DIMS)}})


def test_binary_layouts_are_packbits_and_the_signed_form_is_less_128() -> None:
    vectors = unit(3)
    out = typed_embeddings(vectors, ["ubinary", "binary"], RANGED)
    np.testing.assert_array_equal(out["ubinary"], np.packbits(vectors > 0, axis=1))
    np.testing.assert_array_equal(out["binary"].astype(int), out["ubinary"].astype(int) - 128)
    assert out["ubinary"].dtype == np.uint8 and out["binary"].dtype == np.int8 and out["ubinary"].shape == (3, 2)


def test_int8_codes_scale_each_dimension_by_its_range_and_clip() -> None:
    # Given a range of -0.5..0.5: the low end is 0, the high end 255, the middle 128 (127.5 rounds to even)
    vectors = np.array([[-0.5, 0.5, 0.0, -9.0, 9.0] + [0.0] * (DIMS - 5)], np.float32)
    out = typed_embeddings(vectors, ["uint8", "int8"], RANGED)
    assert out["uint8"][0, :5].tolist() == [0, 255, 128, 0, 255]
    np.testing.assert_array_equal(out["int8"].astype(int), out["uint8"].astype(int) - 128)


def test_codes_depend_on_the_vector_and_ranges_alone() -> None:
    vectors = unit(64)
    one_by_one = np.concatenate([quantize_uint8(vectors[i : i + 1], *RANGED.embedding_ranges[DIMS]) for i in range(64)])
    np.testing.assert_array_equal(one_by_one, quantize_uint8(vectors, *RANGED.embedding_ranges[DIMS]))


def test_matryoshka_truncates_then_renormalises() -> None:
    vectors = unit(4)
    short = matryoshka(vectors, 8, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(short * np.linalg.norm(vectors[:, :8], axis=1, keepdims=True), vectors[:, :8], rtol=1e-5)
    np.testing.assert_array_equal(matryoshka(vectors, 8, normalize=False), vectors[:, :8])


def test_old_manifests_load_and_bad_ranges_are_refused() -> None:
    old = manifest()
    assert old.embedding_ranges == {} and old.matryoshka_dimensions == () and old.output_dimensions == (DIMS,)
    sized = manifest(matryoshka_dimensions=[8], embedding_ranges={"by_dimensions": {"8": ranges(8), "16": ranges(16)}})
    assert sized.output_dimensions == (16, 8) and set(sized.embedding_ranges) == {8, 16}
    for bad in (
        {"matryoshka_dimensions": [16]},
        {"embedding_ranges": {"by_dimensions": {"8": ranges(8)}}},
        {"embedding_ranges": {"by_dimensions": {"16": ranges(15)}}},
        {"embedding_ranges": {"by_dimensions": {"16": ranges(16, low=1.0, high=0.0)}}},
    ):
        with pytest.raises(ModelUnavailable):
            manifest(**bad)


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"types": ("int8",)}, "embedding_types"),  # no ranges for that size
        ({"dimensions": 8}, "output_dimension"),  # not a Matryoshka model
        ({"dimensions": 12, "types": ("ubinary",)}, "output_dimension"),
    ],
)
def test_the_task_refuses_what_the_model_cannot_give(request_fields: dict, param: str) -> None:
    request = EmbedRequest(["x"], "m", shape="cohere", **request_fields)
    with pytest.raises(BadRequest) as refused:
        EmbedTask().check(request, manifest())
    assert refused.value.param == param


def test_binary_needs_a_size_divisible_by_8() -> None:
    model = manifest(matryoshka_dimensions=[12])
    with pytest.raises(BadRequest, match="divisible by 8"):
        EmbedTask().check(EmbedRequest(["x"], "m", dimensions=12, types=("binary",), shape="cohere"), model)
    EmbedTask().check(EmbedRequest(["x"], "m", dimensions=12, types=("float",), shape="cohere"), model)


@pytest.mark.parametrize("kind", ["float", "int8", "uint8", "binary", "ubinary", "base64"])
def test_the_reply_bound_holds_each_type_as_lambda_returns_it(kind: str) -> None:
    # The worst values: -1.2345678e-05-like floats, -128 / 255 codes, 384 dimensions
    vectors = np.full((5, 384), -1.2345678e-05, np.float32)
    model = manifest(dimensions=384, embedding_ranges={"by_dimensions": {"384": ranges(384, 0.0, 1.0)}})
    items = typed_embeddings(vectors, [kind], model)[kind]
    reply = {"id": "0" * 36, "embeddings": {kind: items}, "texts": ["a"] * 5, "meta": {}}
    proxied = json.dumps({"statusCode": 200, "body": dumps(reply)})
    bound = estimate_embedding_bytes(5, 384, [kind])
    assert len(proxied) <= bound
    if kind != "float":  # and it is near the real size, not a float's bound for everything
        assert bound - 4096 < 5 * (384 * 15)


def test_the_texts_bound_holds_hostile_texts_escaped_twice() -> None:
    texts = ['quote " backslash \\ ', "control \x01\x1f", "é中文 🙂 emoji", "plain ascii text"]
    escaped_twice = json.dumps(dumps(texts))  # the body is a JSON string inside Lambda's JSON reply
    assert len(escaped_twice) <= texts_json_bytes(texts)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"texts": ["x"], "embedding_types": ["float", "int4"]}, "embedding_types[1]"),
        ({"texts": ["x"], "embedding_types": []}, "embedding_types"),
        ({"texts": ["x"], "embedding_types": "int8"}, "embedding_types"),
        ({"texts": ["x"], "truncate": "MIDDLE"}, "truncate"),
        ({"texts": ["x"], "input_type": "query"}, "input_type"),
        ({"texts": ["x"], "output_dimension": 0}, "output_dimension"),
        ({"texts": ["x"], "max_tokens": -1}, "max_tokens"),
        ({"texts": ["x"], "priority": "high"}, "priority"),
        ({"texts": ["x"], "images": ["data:image/png;base64,AA=="]}, "images"),
        ({"texts": ["x"], "inputs": [{"content": []}]}, "inputs"),
        ({"texts": []}, "texts"),
        ({"texts": ["x"], "dimensions": 8}, "dimensions"),
    ],
)
def test_the_cohere_parser_names_the_field(body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_embed_request({"model": "m", **body}, 2)
    assert refused.value.param == param and refused.value.status == 400


def test_the_cohere_parser_defaults() -> None:
    v2 = parse_embed_request({"model": "m", "texts": ["x"], "embedding_types": ["int8", "int8", "float"]}, 2)
    assert v2.types == ("int8", "float") and v2.truncate == "END" and v2.shape == "cohere"
    assert parse_embed_request({"model": "m", "texts": ["x"]}, 2).wanted == ("float",)
    v1 = parse_embed_request({"texts": ["x"]}, 1)
    assert v1.types == () and v1.model is None and v1.wanted == ("float",)
    with pytest.raises(BadRequest):
        parse_embed_request({"texts": ["x"], "output_dimension": 8}, 1)  # a v2 field
