"""The GPU container's HTTP transport on 127.0.0.1, with the real model on CPU and raw sockets as clients.

Every request gets a JSON reply (never a closed or reset connection): bursts of connections,
malformed headers, bodies too large, too slow, nested too deep or holding lone surrogates.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantfn.config import LimitSettings, RuntimeSettings, ServerSettings, Settings
from tests.conftest import load_gpu_server

server_module = load_gpu_server()
MODEL = "all-MiniLM-L6-v2"


def start(models_root: Path, max_body_bytes: int = LimitSettings.max_body_bytes, **overrides) -> object:
    settings = Settings(
        runtime=RuntimeSettings(models_root=models_root, threads=1),
        limits=LimitSettings(max_body_bytes=max_body_bytes),
        server=ServerSettings(gpu_provider="cpu", host="127.0.0.1", port=0, **overrides),
    )
    server = server_module.EndpointServer(settings, server_module.choose_model(settings, ["CPUExecutionProvider"]))
    server.load()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture(scope="module")
def endpoint(models_root: Path) -> Iterator[object]:
    server = start(models_root, read_timeout_ms=500, max_body_bytes=1 << 20)
    yield server
    server.shutdown()
    server.server_close()


def exchange(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes, read one reply: (status, JSON body). Raises on a reset or a reply that is not JSON."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed without a reply: {reply!r}")
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        assert headers["content-type"] == "application/json"
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-reply")
            body += chunk
        return int(lines[0].split()[1]), json.loads(body)


def post(body: bytes, extra: str = "") -> bytes:
    head = f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def port_of(server) -> int:
    return server.server_address[1]


def test_a_good_request_is_answered(endpoint) -> None:
    status, body = exchange(port_of(endpoint), post(json.dumps({"model": MODEL, "input": ["hello"]}).encode()))
    assert status == 200 and len(body["data"][0]["embedding"]) == 384


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400, "invalid_request"),
        (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "invalid_request"),
        (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n", 413, "body_too_large"),
        (b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, None),
        (post(b'{"model": "\\ud800", "input": ["x"]}'), 400, None),
        (post(b'{"model": "' + MODEL.encode() + b'", "input": ["a \\udfff b"]}'), 400, None),
        (post(b"[" * 5000 + b"]" * 5000), 400, None),
        (post(b'{"model": ' * 3000 + b"1" + b"}" * 3000), 400, None),
        (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{", 408, "request_timeout"),
        (b"NONSENSE\r\n\r\n", 400, "bad_http_request"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "bad_http_request"),
        (post(b"{}", extra="X-Big: " + "b" * 70000 + "\r\n"), 431, "bad_http_request"),
    ],
    ids=[
        "content-length-abc",
        "content-length-negative",
        "content-length-1tb",
        "chunked",
        "lone-surrogate-model",
        "lone-surrogate-input",
        "deep-array",
        "deep-object",
        "body-too-slow",
        "bad-request-line",
        "uri-too-long",
        "header-too-long",
    ],
)
def test_a_malformed_request_gets_a_json_4xx_not_a_closed_connection(
    endpoint, request_bytes: bytes, status: int, code: str | None
) -> None:
    got, body = exchange(port_of(endpoint), request_bytes)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if code:
        assert body["error"]["code"] == code
    # and the server still serves
    assert exchange(port_of(endpoint), post(json.dumps({"model": MODEL, "input": ["ok"]}).encode()))[0] == 200


def burst(port: int, count: int) -> tuple[Counter, list[str]]:
    """``count`` connections opened at the same instant, each sending one request; statuses and failures."""
    statuses: Counter = Counter()
    failures: list[str] = []
    barrier, lock = threading.Barrier(count), threading.Lock()
    data = post(json.dumps({"model": MODEL, "input": ["a burst of small requests"]}).encode())

    def one() -> None:
        barrier.wait()
        try:
            status, body = exchange(port, data, timeout_s=60)
            outcome = f"{status} {body['error']['code']}" if status != 200 else "200"
            with lock:
                statuses[outcome] += 1
        except (OSError, ValueError) as exc:
            with lock:
                failures.append(exc.__class__.__name__)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return statuses, failures


def test_a_burst_of_200_connections_is_answered_without_a_single_reset(endpoint) -> None:
    statuses, failures = burst(port_of(endpoint), 200)
    assert failures == [] and sum(statuses.values()) == 200
    assert set(statuses) <= {"200", "503 server_busy"}, statuses


def test_requests_beyond_the_in_flight_cap_get_503_server_busy_never_a_reset(models_root: Path) -> None:
    server = start(models_root, max_inflight=4, queue_max=2)
    try:
        statuses, failures = burst(port_of(server), 200)
    finally:
        server.shutdown()
        server.server_close()
    assert failures == [] and sum(statuses.values()) == 200
    assert statuses["503 server_busy"] > 0 and statuses["200"] > 0 and set(statuses) == {"200", "503 server_busy"}


OVERSIZED = 7 * 2**20  # over the fixture's 1 MiB limit, under the discard bound: the body is read, then refused


def test_given_an_oversized_body_from_http_client_then_it_reads_the_413_not_a_broken_pipe(endpoint) -> None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port_of(endpoint), timeout=30)
    try:
        # When http.client writes all 7 MiB before it reads (it always does)
        connection.request("POST", "/invocations", body=b"x" * OVERSIZED, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        body = json.loads(reply.read())
        # Then it gets the 413 with the JSON error naming the limit
        assert reply.status == 413 and body["error"]["code"] == "body_too_large"
        assert "QUANTFN_MAX_BODY_BYTES" in body["error"]["message"]
        # and the connection, its body read to the end, still serves the next request
        connection.request("POST", "/invocations", body=json.dumps({"model": MODEL, "input": ["ok"]}).encode())
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_given_an_oversized_body_from_requests_then_it_reads_the_413(endpoint) -> None:
    import requests

    reply = requests.post(f"http://127.0.0.1:{port_of(endpoint)}/invocations", data=b"x" * OVERSIZED, timeout=30)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"


def test_given_expect_100_continue_then_an_oversized_body_is_refused_before_it_is_sent(endpoint) -> None:
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % OVERSIZED
    status, body = exchange(port_of(endpoint), head)  # the client sends no body: it waits for 100 Continue
    assert status == 413 and body["error"]["code"] == "body_too_large"


def test_given_a_body_past_the_discard_bound_then_the_413_comes_at_once(endpoint, monkeypatch) -> None:
    monkeypatch.setattr(type(endpoint), "discard_body_bytes", 2 * 2**20)
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % OVERSIZED
    status, body = exchange(port_of(endpoint), head + b"x" * 1000, timeout_s=5)
    assert status == 413 and body["error"]["code"] == "body_too_large"
