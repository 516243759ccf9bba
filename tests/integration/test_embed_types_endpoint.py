"""The GPU endpoint route gives the same codes: the endpoint is asked for float vectors at the model's own size,
and the sizes and types are made here from the same manifest ranges (the stub endpoint on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantfn.config import EndpointSettings, LimitSettings, RuntimeSettings, Settings
from quantfn.models.manifest import Manifest
from quantfn.registry import Registry
from quantfn.tasks.embed import matryoshka, typed_embeddings
from quantfn.wire import routes
from tests.conftest import DEFAULT_MODEL_ID, MATRYOSHKA_MODEL_ID
from tests.integration.endpoint_stub import StubEndpoint, unit_vectors

TEXTS = ["first text", "second text"]
TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


def registry_with(root: Path, url: str) -> Registry:
    """Both models, one input allowed here: a request of two goes to the endpoint."""
    models = tuple((m, f"layer:{m}") for m in (DEFAULT_MODEL_ID, MATRYOSHKA_MODEL_ID))
    return Registry(
        Settings(
            runtime=RuntimeSettings(models=models, models_root=root, threads=1),
            limits=LimitSettings(max_inputs=1),
            endpoint=EndpointSettings(url=url, max_attempts=1),
        )
    )


def post(registry: Registry, body: dict) -> routes.Reply:
    return routes.respond("POST", "/v2/embed", lambda: json.dumps(body).encode(), remaining_ms=None, registry=registry)


@pytest.mark.parametrize(("model", "size"), [(DEFAULT_MODEL_ID, None), (MATRYOSHKA_MODEL_ID, 128)])
def test_the_endpoint_route_gives_the_codes_the_ranges_give(
    typed_models_root: Path, model: str, size: int | None
) -> None:
    manifest = Manifest.read(typed_models_root / model)
    with StubEndpoint() as stub:
        registry = registry_with(typed_models_root, stub.url)
        body = {"model": model, "texts": TEXTS, "input_type": "search_query", "embedding_types": TYPES}
        if size:
            body["output_dimension"] = size
        reply = post(registry, body | {"truncate": "START"})
        sent = json.loads(stub.requests[0]["body"])
    # Then the request went to the endpoint, which was asked for base64 floats at the model's size, cut from the start
    assert reply.status == 200 and reply.route is not None and reply.route.route == "endpoint"
    assert sent == {"model": manifest.upstream, "input": TEXTS, "encoding_format": "base64", "truncate": "START"}
    # And every type is what the endpoint's vectors give here, at the asked size
    vectors = unit_vectors(len(TEXTS))
    vectors = matryoshka(vectors, size, True) if size else vectors
    expected = typed_embeddings(vectors, TYPES, manifest)
    for kind in TYPES:
        np.testing.assert_array_equal(np.asarray(reply.body["embeddings"][kind]), np.asarray(expected[kind]), kind)
