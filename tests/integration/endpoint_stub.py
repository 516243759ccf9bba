"""A scripted stand-in for the GPU endpoint: a real HTTP server on 127.0.0.1.

Each request takes the next ``Step`` of the script (then ``default``): answer with
a status after a delay, with a given body or, for 200 without one, a valid
embeddings reply for the request it got; ``trickle_s`` sends the body a byte at a
time, ``reset`` sends half of it and resets the connection. Every request is
recorded, with the ``time.monotonic`` it arrived at.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

DIMENSIONS = 384


@dataclass(frozen=True)
class Step:
    status: int = 200
    delay_s: float = 0.0
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    trickle_s: float = 0.0
    reset: bool = False


def unit_vectors(count: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSIONS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def embeddings_reply(count: int, encoding_format: str = "float") -> dict[str, Any]:
    rows = unit_vectors(count)
    items: list[Any] = (
        [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in rows]
        if encoding_format == "base64"
        else rows.tolist()
    )
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": item} for i, item in enumerate(items)],
        "model": "stub",
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }


class StubEndpoint:
    """Context manager: ``with StubEndpoint([Step(429), Step(200)]) as stub: ... stub.url``."""

    def __init__(self, script: list[Step] | None = None, default: Step | None = None, port: int = 0) -> None:
        self.script = list(script or [])
        self.default = default or Step()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with stub._lock:
                    step = stub.script.pop(0) if stub.script else stub.default
                    record = {"path": self.path, "headers": dict(self.headers), "body": raw, "at": time.monotonic()}
                    stub.requests.append(record)
                if step.delay_s:
                    stub._stopping.wait(step.delay_s)
                body = step.body
                if body is None and step.status == 200:
                    sent = json.loads(raw)
                    body = json.dumps(embeddings_reply(len(sent["input"]), sent.get("encoding_format", "float")))
                    body = body.encode()
                body = body or b'{"error": {"message": "stub error"}}'
                try:
                    self.send_response(step.status)
                    for name, value in step.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if step.reset:
                        self.wfile.write(body[: len(body) // 2])
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.rfile.close()
                        self.connection.close()  # with SO_LINGER 0: a reset, not a clean close
                        self.close_connection = True
                    elif step.trickle_s:
                        for index in range(len(body)):
                            if stub._stopping.wait(step.trickle_s):
                                break
                            self.wfile.write(body[index : index + 1])
                    else:
                        self.wfile.write(body)
                except OSError:
                    pass  # the client gave up first: that is what a slow-server test wants

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> StubEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
