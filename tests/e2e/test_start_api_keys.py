"""API keys under `sam local start-api`: the official openai and cohere clients, unchanged, through the authorizer.

The template's default AuthMode KEY puts the authorizer function in front of every route; SAM runs it as API
Gateway would (payload 2.0, simple responses) and passes its context to the API function. Keys are made with
`quantfn keys create` against moto on 127.0.0.1, where the authorizer reads them. A good key gets the answer;
a wrong, missing or revoked one gets 401/403, which each client raises as its own typed error.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import cohere
import openai
import pytest

from quantfn.cli import main
from tests.events_expected import EXAMPLE_KEY, REVOKED_KEY

pytestmark = pytest.mark.e2e
MODEL = "all-MiniLM-L6-v2"
WRONG_KEY = EXAMPLE_KEY[:-6] + "wrong0"
DOCUMENTS = ["Paris is the capital of France.", "Bananas are yellow."]


@pytest.fixture(scope="module")
def fresh_key(aws_resources: dict[str, str]) -> Iterator[str]:
    """A key made by the CLI, as a user would, in the store the authorizer reads (moto)."""
    import contextlib
    import io
    import os

    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = aws_resources["endpoint"]
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["keys", "create", "--name", "e2e", "--prefix", aws_resources["keys_prefix"]]) == 0
        yield out.getvalue().strip()
    finally:
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous


def openai_client(api_endpoint: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_endpoint}/v1", api_key=key, max_retries=0, timeout=120)


def test_given_a_key_made_with_the_cli_then_the_openai_client_embeds(api_endpoint: str, fresh_key: str) -> None:
    reply = openai_client(api_endpoint, fresh_key).embeddings.create(model=MODEL, input=["hello world", "a key"])
    assert [len(item.embedding) for item in reply.data] == [384, 384]


def test_given_a_key_then_the_cohere_clients_rerank_v1_and_v2(api_endpoint: str, fresh_key: str) -> None:
    v1 = cohere.Client(api_key=fresh_key, base_url=api_endpoint, timeout=120)
    assert v1.rerank(model=MODEL, query="capital of France?", documents=DOCUMENTS).results[0].index == 0
    v2 = cohere.ClientV2(api_key=fresh_key, base_url=api_endpoint, timeout=120)
    assert v2.rerank(model=MODEL, query="capital of France?", documents=DOCUMENTS).results[0].index == 0


@pytest.mark.parametrize("key", [WRONG_KEY, REVOKED_KEY, "sk-not-a-quantfn-key"], ids=["wrong", "revoked", "foreign"])
def test_given_a_bad_key_then_each_client_raises_its_own_permission_error(api_endpoint: str, key: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        openai_client(api_endpoint, key).embeddings.create(model=MODEL, input=["hello"])
    assert refused.value.status_code == 403
    with pytest.raises(cohere.errors.ForbiddenError):
        cohere.ClientV2(api_key=key, base_url=api_endpoint, timeout=120).rerank(
            model=MODEL, query="q", documents=DOCUMENTS
        )


def test_given_no_key_then_the_gateway_answers_401_before_any_function_runs(api_endpoint: str) -> None:
    request = urllib.request.Request(
        f"{api_endpoint}/v1/embeddings",
        data=json.dumps({"model": MODEL, "input": ["hello"]}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 401 and json.loads(refused.value.read()) == {"message": "Unauthorized"}
    # The openai client refuses to start without a key; cohere's, given an empty one, sends a bare "Bearer",
    # refused (401 where the gateway sees no identity, as sam local does; 403 where the authorizer sees one).
    with pytest.raises((cohere.errors.UnauthorizedError, cohere.errors.ForbiddenError)):
        cohere.ClientV2(api_key="", base_url=api_endpoint, timeout=60).rerank(model=MODEL, query="q", documents=["d"])


def test_given_a_key_revoked_with_the_cli_then_the_next_call_is_refused_without_a_deploy(
    api_endpoint: str, aws_resources: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_resources["endpoint"])
    prefix = aws_resources["keys_prefix"]
    assert main(["keys", "create", "--name", "to revoke", "--prefix", prefix]) == 0
    key = capsys.readouterr().out.strip()
    client = openai_client(api_endpoint, key)
    assert len(client.embeddings.create(model=MODEL, input=["before"]).data) == 1
    assert main(["keys", "revoke", key.split("_")[1], "--prefix", prefix]) == 0
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model=MODEL, input=["after"])
