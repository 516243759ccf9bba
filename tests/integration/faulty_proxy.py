"""An HTTP proxy on 127.0.0.1 that injects one fault into the replies for chosen paths.

Put it between a real client (boto3) and a real server (moto): every request is
forwarded upstream; a reply whose request path contains ``match`` gets ``fault``:

- ``stall``: the request is read, no reply ever starts (until the proxy stops);
- ``stall_body``: the headers and half the body, then nothing more;
- ``trickle``: the headers, then the body one byte every ``trickle_s``;
- ``reset``: the headers and half the body, then a TCP reset (SO_LINGER 0);
- ``None``: a faithful proxy (the fault fixed).

``hits`` counts the requests that matched, so a test can see the retries.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyProxy:
    """Context manager: ``with FaultyProxy(moto.url, fault="stall", match="model.onnx") as proxy: ... proxy.url``."""

    def __init__(
        self, upstream: str, fault: str | None = None, match: str = "", trickle_s: float = 0.4, port: int = 0
    ) -> None:
        self.fault, self.match, self.trickle_s = fault, match, trickle_s
        self.hits = 0
        self._upstream = urlsplit(upstream)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def set(self, fault: str | None, match: str | None = None) -> None:
        with self._lock:
            self.fault = fault
            if match is not None:
                self.match = match

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        upstream = http.client.HTTPConnection(self._upstream.hostname, self._upstream.port, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream.request(handler.command, handler.path, body=body, headers=headers)
        reply = upstream.getresponse()
        data = reply.read()
        upstream.close()
        with self._lock:
            fault = self.fault if self.match in handler.path else None
            if fault:
                self.hits += 1
        if fault == "stall":
            self._stopping.wait(60)
            handler.close_connection = True
            return
        handler.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        try:
            if fault is None:
                handler.wfile.write(data)
            elif fault == "trickle":
                for index in range(len(data)):
                    if self._stopping.wait(self.trickle_s):
                        break
                    handler.wfile.write(data[index : index + 1])
                    handler.wfile.flush()
            else:
                handler.wfile.write(data[: len(data) // 2])
                handler.wfile.flush()
                if fault == "reset":  # closing with SO_LINGER 0 sends RST, not FIN
                    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    handler.rfile.close()
                    handler.connection.close()
                else:  # stall_body
                    self._stopping.wait(60)
                handler.close_connection = True
        except OSError:
            handler.close_connection = True  # the client gave up first

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
