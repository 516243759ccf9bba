"""The circuit breaker and the retry loop of EndpointClient, on a fake clock and a scripted transport."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pytest

from quantfn.config import EndpointSettings, Settings
from quantfn.endpoint import CallFailed, CircuitBreaker, EndpointClient, HttpTransport, make_transport
from quantfn.errors import EndpointUnavailable, UpstreamFailed
from tests.conftest import embed_on_endpoint


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class ScriptedTransport:
    """Each post takes the next outcome: an exception to raise, or a reply for ``count`` texts."""

    name = "scripted"

    def __init__(self, clock: Clock, *outcomes: CallFailed | None, cost_s: float = 0.01) -> None:
        self.clock, self.outcomes, self.cost_s = clock, list(outcomes), cost_s
        self.timeouts: list[float] = []

    def post(self, body: bytes, timeout_s: float) -> bytes:
        self.timeouts.append(timeout_s)
        self.clock.now += self.cost_s
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        count = len(json.loads(body)["input"])
        rows = np.eye(count, 4, dtype="<f4")
        data = [{"index": i, "embedding": base64.b64encode(row.tobytes()).decode()} for i, row in enumerate(rows)]
        return json.dumps({"object": "list", "data": data}).encode()


SETTINGS = Settings(
    endpoint=EndpointSettings(
        url="http://unused",
        timeout_ms=2000,
        max_attempts=4,
        backoff_base_ms=100,
        backoff_max_ms=250,
        breaker_failures=2,
        breaker_cooldown_ms=10_000,
    )
)


def make_client(clock: Clock, *outcomes: CallFailed | None, jitter: float = 1.0, **overrides) -> tuple:
    transport = ScriptedTransport(clock, *outcomes)
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock.sleep(seconds)

    settings = Settings(endpoint=replace(SETTINGS.endpoint, **overrides))
    client = EndpointClient(settings, transport, sleep=sleep, jitter=lambda: jitter, clock=clock)
    return client, transport, pauses


def call(client: EndpointClient, clock: Clock, within_s: float = 20.0):
    return embed_on_endpoint(client, ["a", "b"], "m", dimensions=4, normalized=True, deadline_s=clock.now + within_s)


def throttled() -> CallFailed:
    return CallFailed("HTTP 429", retryable=True, status=429)


def test_the_breaker_opens_after_consecutive_failures_and_half_opens_for_one_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=2, cooldown_s=5, clock=clock)
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.retry_in_s() == pytest.approx(5)
    clock.now += 5
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_failure()  # the probe failed: a full cool-down again
    assert breaker.state == "open" and breaker.retry_in_s() == pytest.approx(5)
    clock.now += 5
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=5, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    # Given a transport that throttles three times, and jitter at its maximum
    clock = Clock()
    client, _, pauses = make_client(clock, throttled(), throttled(), throttled())
    reply = call(client, clock)
    # Then the pauses are base * 2^n, capped at the maximum, and the fourth attempt answers
    assert pauses == pytest.approx([0.1, 0.2, 0.25])
    assert reply.attempts == 4 and reply.output.shape == (2, 4)


def test_jitter_draws_anywhere_below_the_cap() -> None:
    clock = Clock()
    client, _, pauses = make_client(clock, throttled(), throttled(), jitter=0.5)
    call(client, clock)
    assert pauses == pytest.approx([0.05, 0.1])


def test_a_4xx_is_tried_once() -> None:
    clock = Clock()
    client, transport, pauses = make_client(clock, CallFailed("HTTP 400", retryable=False, status=400))
    with pytest.raises(UpstreamFailed, match="HTTP 400"):
        call(client, clock)
    assert len(transport.timeouts) == 1 and pauses == []


def test_no_retry_starts_that_could_not_finish_before_the_deadline() -> None:
    # Given 0.3 s left and 10 ms attempts: the first pause (0.1 s) fits, the second (0.2 s) would not
    clock = Clock()
    client, transport, _ = make_client(clock, throttled(), throttled(), throttled())
    with pytest.raises(UpstreamFailed, match="attempt 2"):
        call(client, clock, within_s=0.3)
    assert len(transport.timeouts) == 2
    # and each attempt's timeout was the time left, not the configured 2 s
    assert transport.timeouts[0] == pytest.approx(0.3) and transport.timeouts[1] == pytest.approx(0.19)


def test_failed_calls_open_the_circuit_and_then_no_attempt_is_made() -> None:
    clock = Clock()
    down = CallFailed("connection failed", retryable=True)
    client, transport, _ = make_client(clock, *[down] * 8)
    for _ in range(2):
        with pytest.raises(UpstreamFailed):
            call(client, clock)
    attempts = len(transport.timeouts)
    with pytest.raises(EndpointUnavailable) as caught:
        call(client, clock)
    assert caught.value.code == "endpoint_circuit_open" and len(transport.timeouts) == attempts
    assert caught.value.to_body()["error"]["message"] == EndpointUnavailable.public_message


def test_an_invalid_reply_counts_as_a_failure() -> None:
    clock = Clock()
    client, _, _ = make_client(clock, breaker_failures=1)
    with pytest.raises(UpstreamFailed, match="shape"):
        embed_on_endpoint(client, ["a", "b"], "m", dimensions=8, normalized=True, deadline_s=clock.now + 5)
    assert client.breaker.state == "open"


def test_the_transport_follows_the_settings() -> None:
    with pytest.raises(EndpointUnavailable, match="no GPU endpoint is configured"):
        make_transport(Settings())
    assert make_transport(Settings(endpoint=EndpointSettings(name="gpu"))).name == "sagemaker:gpu"
    both = make_transport(Settings(endpoint=EndpointSettings(name="gpu", url="http://10.0.0.5:8080")))
    assert isinstance(both, HttpTransport) and both.path == "/invocations"
    assert HttpTransport("https://gpu.example/base/invocations", 1).path == "/base/invocations"
    with pytest.raises(EndpointUnavailable):
        HttpTransport("ftp://gpu.example", 1)
