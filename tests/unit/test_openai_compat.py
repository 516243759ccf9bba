from __future__ import annotations

import base64

import numpy as np
import pytest

from quantfn.config import LimitSettings, Settings
from quantfn.errors import BadRequest, QuantfnError, TooLarge
from quantfn.inference import Result
from quantfn.models.manifest import Manifest
from quantfn.routing import Shape, by_size
from quantfn.tasks import EmbedRequest
from quantfn.wire.body import load_json_body
from quantfn.wire.openai import embeddings_response, parse_embeddings_request

MODEL = "all-MiniLM-L6-v2"


def test_a_string_input_becomes_one_text() -> None:
    request = parse_embeddings_request({"model": MODEL, "input": "hello"})
    assert request.texts == ["hello"]
    assert request.encoding_format == "float"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"input": "x"}, "model"),
        ({"model": 3, "input": "x"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": None}, "input"),
        ({"model": MODEL, "input": ""}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": {"a": 1}}, "input"),
        ({"model": MODEL, "input": ["ok", " "]}, "input[1]"),
        ({"model": MODEL, "input": ["ok", 7]}, "input[1]"),
        ({"model": MODEL, "input": ["ok", None]}, "input[1]"),
        ({"model": MODEL, "input": [[1, 2]]}, "input[0]"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": MODEL, "input": "x", "dimensions": "384"}, "dimensions"),
        ({"model": MODEL, "input": "x", "dimensions": True}, "dimensions"),
        ({"model": MODEL, "input": "x", "top_k": 3}, "top_k"),
    ],
)
def test_bad_requests_name_the_field(body: object, param: str | None) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_embeddings_request(body)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_too_many_inputs_is_413_naming_the_limit() -> None:
    request = parse_embeddings_request({"model": MODEL, "input": ["a"] * 5})
    settings = Settings(limits=LimitSettings(max_inputs=4))
    plan = by_size(Shape(len(request.texts), 100, 5000, 256), settings)  # the router counts, not the parser
    assert plan is not None
    with pytest.raises(TooLarge) as caught:
        raise plan.refusal()
    assert caught.value.status == 413
    assert "QUANTFN_MAX_INPUTS" in caught.value.message and "4" in caught.value.message


def test_body_over_the_byte_limit_is_413() -> None:
    with pytest.raises(TooLarge, match="QUANTFN_MAX_BODY_BYTES"):
        load_json_body(b"x" * 11, max_bytes=10)


@pytest.mark.parametrize("raw", [b"", b"  ", b"{", b"[1,", b"\xff\xfe"])
def test_malformed_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        load_json_body(raw, max_bytes=100)


def test_base64_is_little_endian_float32_of_the_same_vectors() -> None:
    vectors = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    manifest = Manifest("m", "embed", {}, 5, 256, ("input_ids", "attention_mask"), "last_hidden_state")
    result = Result("m", manifest, vectors, token_counts=[3, 4], ok=[0, 1])
    as_float = embeddings_response(result, EmbedRequest(["a", "b"], "m"))
    as_b64 = embeddings_response(result, EmbedRequest(["a", "b"], "m", encoding_format="base64"))
    for float_item, b64_item in zip(as_float["data"], as_b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b64_item["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(float_item["embedding"], abs=0)
    assert as_float["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [item["index"] for item in as_float["data"]] == [0, 1]


def test_server_errors_hide_their_detail() -> None:
    body = QuantfnError("/opt/models/x/model.onnx exploded").to_body()
    assert "/opt" not in str(body)
    assert body["error"]["type"] == "server_error"
