"""API keys: the authorizer function and `quantfn keys` against SSM Parameter Store (moto on 127.0.0.1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import boto3
import pytest

from quantfn.auth.keys import KeyRecord, digest
from quantfn.auth.store import KeyStore, KeyStoreUnavailable
from quantfn.cli import main
from tests.conftest import EVENTS, FakeLambdaContext, HandlerOutput, handler_output, load_event
from tests.events_expected import AUTHORIZER_EVENTS, EXAMPLE_KEY, REVOKED_KEY

PREFIX = "/quantfn/test-stack/keys/"


def seed_example_keys(ssm: Any, prefix: str = PREFIX) -> None:
    """The records the authorizer events expect: examplekey01 active, examplekey02 revoked."""
    records = [
        KeyRecord("examplekey01", "events/ example", digest(EXAMPLE_KEY), "2026-12-07T12:00:00+00:00"),
        KeyRecord("examplekey02", "events/ revoked", digest(REVOKED_KEY), "2026-12-01T12:00:00+00:00", "2026-12-02"),
    ]
    for record in records:
        ssm.put_parameter(Name=prefix + record.key_id, Value=json.dumps(asdict(record)), Type="String", Overwrite=True)


@pytest.fixture
def authorizer(aws, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from functions.authorizer import app
    from quantfn.config import get_settings

    monkeypatch.setenv("QUANTFN_AUTH_KEYS_PREFIX", PREFIX)
    monkeypatch.setenv("QUANTFN_AUTH_CACHE_SECONDS", "0")  # every check reads SSM: revocation shows at once
    get_settings.cache_clear()
    app.get_store.cache_clear()
    seed_example_keys(boto3.client("ssm"))
    yield app
    app.get_store.cache_clear()
    get_settings.cache_clear()


@pytest.fixture
def output(authorizer, capsys: pytest.CaptureFixture[str]) -> Iterator[HandlerOutput]:
    with handler_output(authorizer.logger.name, capsys) as printed:
        yield printed


def authorize(app: Any, event: dict[str, Any]) -> dict[str, Any]:
    return app.lambda_handler(event, FakeLambdaContext(function_name="quantfn-authorizer"))


def bearer(key: str, path: str = "/v1/embeddings") -> dict[str, Any]:
    event = load_event("authorizer-key-valid.json")
    event["identitySource"] = [f"Bearer {key}"]
    event["headers"]["authorization"] = f"Bearer {key}"
    event["rawPath"] = path
    return event


def test_every_authorizer_event_file_has_an_expectation() -> None:
    assert sorted(p.name for p in EVENTS.glob("authorizer-*.json")) == sorted(AUTHORIZER_EVENTS)


@pytest.mark.parametrize("name", sorted(AUTHORIZER_EVENTS))
def test_given_an_event_then_the_simple_answer_carries_the_key_id_never_the_key(
    name: str, authorizer, output: HandlerOutput
) -> None:
    authorized, reason, key_id = AUTHORIZER_EVENTS[name]
    # When API Gateway asks about the event's Authorization header
    answer = authorize(authorizer, load_event(name))
    # Then the simple response says yes or no, with the key's id (never the key) for the API's logs and metrics
    assert answer == {"isAuthorized": authorized, "context": {"key_id": key_id}}
    printed = output.read()
    (record,) = [r for r in printed.records if r["message"] in {"key accepted", "key refused"}]
    assert (record["reason"], record["level"]) == (reason, "INFO")
    assert record.get("key_id", "") == key_id
    assert ("KeysAccepted" if authorized else "KeysRefused") in printed.metrics
    # and no secret part of any key reaches the output
    assert "ExampleSecret" not in printed.text and "WrongSecret" not in printed.text


def test_given_keys_made_with_the_cli_then_rotation_needs_no_deploy(
    authorizer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a key made with the CLI, and the authorizer already running (its store made once)
    assert main(["keys", "create", "--name", "team-a", "--stack", "test-stack"]) == 0
    old = capsys.readouterr().out.strip()
    assert authorize(authorizer, bearer(old))["isAuthorized"] is True
    # When a second key is made, both work at once
    capsys.readouterr()  # the authorizer's EMF metrics
    assert main(["keys", "create", "--name", "team-a 2027", "--stack", "test-stack"]) == 0
    new = capsys.readouterr().out.strip()
    assert authorize(authorizer, bearer(new))["isAuthorized"] is True
    assert authorize(authorizer, bearer(old))["isAuthorized"] is True
    # and when the old one is revoked it is refused, with no deploy and no restart
    old_id = old.split("_")[1]
    assert main(["keys", "revoke", old_id, "--stack", "test-stack"]) == 0
    assert authorize(authorizer, bearer(old)) == {"isAuthorized": False, "context": {"key_id": old_id}}
    assert authorize(authorizer, bearer(new))["isAuthorized"] is True
    # and list shows every key's state, never a key or its hash
    capsys.readouterr()
    assert main(["keys", "list", "--json", "--stack", "test-stack"]) == 0
    listed = {r["key_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[old_id]["revoked_at"] and not listed[new.split("_")[1]]["revoked_at"]
    assert listed["examplekey01"]["name"] == "events/ example" and len(listed) == 4
    assert main(["keys", "list", "--stack", "test-stack"]) == 0
    table = capsys.readouterr().out
    assert old_id in table and "revoked" in table and old not in table and digest(old) not in table


def test_given_an_unknown_key_id_then_revoke_refuses_with_exit_2(aws, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "revoke", "nosuchkey000", "--prefix", PREFIX]) == 2
    assert "No key" in capsys.readouterr().err


class CountingSsm:
    """The real client, counting GetParameter calls."""

    def __init__(self, ssm: Any) -> None:
        self.ssm, self.reads = ssm, 0

    def get_parameter(self, **kwargs: Any) -> Any:
        self.reads += 1
        return self.ssm.get_parameter(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ssm, name)


def test_a_record_is_read_once_per_cache_period_and_a_stale_one_serves_while_ssm_is_down(aws) -> None:
    from botocore.config import Config

    seed_example_keys(boto3.client("ssm"))
    now = [0.0]
    ssm = CountingSsm(boto3.client("ssm"))
    store = KeyStore(ssm, PREFIX, cache_seconds=60, clock=lambda: now[0])
    assert [store.get("examplekey01").key_id for _ in range(5)] == ["examplekey01"] * 5
    assert store.get("nosuchkey000") is None and store.get("nosuchkey000") is None
    assert ssm.reads == 2
    # When SSM stops answering after the cache period
    now[0] = 120.0
    down = boto3.client("ssm", endpoint_url="http://127.0.0.1:9", config=Config(retries={"total_max_attempts": 1}))
    store.ssm = down
    # Then a key read before keeps working; one never read is a 503, not a refusal
    assert store.get("examplekey01").key_id == "examplekey01"
    with pytest.raises(KeyStoreUnavailable) as caught:
        store.get("examplekey02")
    assert caught.value.status == 503 and "127.0.0.1" not in caught.value.message


def test_given_ssm_down_then_the_authorizer_fails_loudly_instead_of_caching_a_refusal(
    authorizer, output: HandlerOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quantfn.config import get_settings

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    get_settings.cache_clear()
    authorizer.get_store.cache_clear()
    # When the key store cannot be read, the authorizer raises: API Gateway answers 500 and caches nothing
    with pytest.raises(KeyStoreUnavailable):
        authorize(authorizer, load_event("authorizer-key-valid.json"))
    # and it says so once, at ERROR, with a code and a safe reason, and counts it
    printed = output.read()
    (record,) = printed.at("WARNING", "ERROR")
    assert (record["level"], record["error_code"]) == ("ERROR", "key_store_unavailable")
    assert record["reason"] == "SSM: EndpointConnectionError"
    assert printed.metrics["KeyStoreErrors"] == [{"namespace": "quantfn", "service": "quantfn-authorizer"}]
    assert "ExampleSecret" not in printed.text
