"""`quantfn serve`: the real API handler behind a local HTTP server, for clients that speak HTTP.

Each HTTP request becomes the API Gateway HTTP API (payload 2.0) event Lambda
would get, body base64-encoded as API Gateway does for non-text content, and goes
through ``functions.api.app.lambda_handler`` unchanged; its reply goes back as
HTTP. The openai and cohere clients, curl and the tests point ``base_url`` here.
Loopback only by default: this is a development server, not a production one.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

MAX_BODY = 10 * 1024 * 1024  # API Gateway refuses larger payloads before Lambda sees them
_ONE_AT_A_TIME = threading.Lock()  # an execution environment serves one request at a time


class _Context:
    function_name = "quantfn-api-local"
    memory_limit_in_mb = 2048
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:quantfn-api-local"

    def __init__(self, timeout_s: float = 29.0) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def http_event(method: str, target: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The payload 2.0 event API Gateway sends for one HTTP request."""
    parts = urlsplit(target)
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": {key.lower(): value for key, value in headers.items()},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": "localhost",
            "http": {"method": method, "path": parts.path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "timeEpoch": int(time.time() * 1000),
        },
        "isBase64Encoded": bool(body),
        "body": base64.b64encode(body).decode("ascii") if body else None,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "quantfn-local"

    def _handle(self) -> None:
        from functions.api.app import lambda_handler

        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            self._send(413, {"message": "Request Entity Too Large"}, {})
            return
        body = self.rfile.read(int(length)) if int(length) else b""
        event = http_event(self.command, self.path, dict(self.headers.items()), body)
        with _ONE_AT_A_TIME:
            reply = lambda_handler(event, _Context())
        data = reply.get("body") or ""
        raw = base64.b64decode(data) if reply.get("isBase64Encoded") else data.encode("utf-8")
        self._send(reply["statusCode"], raw, reply.get("headers") or {})

    def __getattr__(self, name: str) -> Any:
        # Every method (QUERY, TRACE, ...) goes to the handler, which answers 405 on a known path, 404 elsewhere.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def _send(self, status: int, body: bytes | dict[str, Any], headers: dict[str, str]) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":  # a reply to HEAD has the headers alone
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_server(host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server (not yet serving) bound to ``host:port``; port 0 picks a free one."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    return server


def serve(host: str, port: int) -> int:
    server = make_server(host, port)
    print(f"quantfn API on http://{server.server_address[0]}:{server.server_address[1]} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
