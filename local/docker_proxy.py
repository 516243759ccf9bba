"""A Docker API proxy that runs SAM's Lambda containers on the host network, bound to loopback.

`sam local` publishes the emulator's port 8080 to 127.0.0.1:<random> and dials it there. On a
Docker engine without a bridge network (air-gapped CI, rootless setups) that port never opens,
and `--docker-network host` does not help: SAM still publishes ports and dials the mapping.
This proxy sits between SAM and dockerd (``DOCKER_HOST=unix://<socket>``) and rewrites only
``POST /containers/create`` for containers labelled ``sam.cli.container.type=lambda``:

- host network mode, no published ports;
- the emulator listens on 127.0.0.1:<the port SAM dials> (``--runtime-interface-emulator-address``)
  and the Runtime API on another free loopback port, so several containers can share the host
  network (``--runtime-api-address``).

Every other byte passes through unchanged, upgraded (attach) streams included. Stdlib only.

    python local/docker_proxy.py --listen build/local-env/docker.sock [--upstream /var/run/docker.sock]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import threading
from contextlib import closing, suppress

CREATE = re.compile(rb"^POST (/v[0-9.]+)?/containers/create(\?\S*)? HTTP/1\.[01]$")
RIE_SUFFIX = "aws-lambda-rie"
EMULATOR_PORT = "8080/tcp"
LOOPBACK = "127.0.0.1"
CLIENT_LABEL = "io.quantfn.sam-pid"


def free_loopback_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def rewrite_create(body: dict, client_pid: int | None = None) -> dict:
    """Host networking for a SAM Lambda container; any other create request is returned unchanged.

    The container is labelled with the pid of the SAM process that asked for it (``CLIENT_LABEL``),
    so whoever started that SAM can remove what it leaves behind, and only that.
    """
    if (body.get("Labels") or {}).get("sam.cli.container.type") != "lambda":
        return body
    if client_pid:
        body["Labels"][CLIENT_LABEL] = str(client_pid)
    host_config = body.setdefault("HostConfig", {})
    bindings = host_config.pop("PortBindings", None) or {}
    body.pop("ExposedPorts", None)
    host_config["NetworkMode"] = "host"
    entrypoint = body.get("Entrypoint") or []
    emulator = bindings.get(EMULATOR_PORT) or []
    if emulator and entrypoint and entrypoint[0].endswith(RIE_SUFFIX):
        port = emulator[0].get("HostPort")
        # Flags go right after the executable: what follows may be the runtime's own command.
        body["Entrypoint"] = [
            entrypoint[0],
            "--runtime-interface-emulator-address",
            f"{LOOPBACK}:{port}",
            "--runtime-api-address",
            f"{LOOPBACK}:{free_loopback_port()}",
            *entrypoint[1:],
        ]
    return body


class _Reader:
    """Buffered reads from a socket: lines, small bodies, and large bodies streamed through."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buffer += data

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def forward(self, size: int, sink: socket.socket) -> None:
        """Send the next ``size`` bytes to ``sink`` without holding them (build contexts are large)."""
        head = min(size, len(self.buffer))
        sink.sendall(self.buffer[:head])
        del self.buffer[:head]
        size -= head
        while size:
            data = self.sock.recv(min(size, 1 << 20))
            if not data:
                raise EOFError
            sink.sendall(data)
            size -= len(data)

    def take_buffer(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _peer_pid(client: socket.socket) -> int | None:
    with suppress(OSError):
        pid, _, _ = struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return pid
    return None


def _forward_requests(client: socket.socket, upstream: socket.socket) -> None:
    """Client -> dockerd, one HTTP request at a time; raw bytes after an upgrade."""
    reader = _Reader(client)
    with suppress(EOFError, OSError):
        while True:
            request_line = reader.line()
            headers: list[bytes] = []
            while line := reader.line():
                headers.append(line)
            fields = {h.split(b":", 1)[0].strip().lower(): h.split(b":", 1)[1].strip() for h in headers if b":" in h}
            chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
            length = int(fields.get(b"content-length", b"0") or 0)
            if CREATE.match(request_line) and not chunked:
                body = json.loads(reader.exact(length) or b"{}")
                payload = json.dumps(rewrite_create(body, _peer_pid(client))).encode()
                headers = [h for h in headers if not h.lower().startswith(b"content-length:")]
                headers.append(b"Content-Length: %d" % len(payload))
                upstream.sendall(b"\r\n".join([request_line, *headers]) + b"\r\n\r\n" + payload)
            else:
                upstream.sendall(b"\r\n".join([request_line, *headers]) + b"\r\n\r\n")
                if chunked:
                    _forward_chunked(reader, upstream)
                elif length:
                    reader.forward(length, upstream)
            if b"upgrade" in fields.get(b"connection", b"").lower() or b"upgrade" in fields:
                upstream.sendall(reader.take_buffer())
                _pump(client, upstream)
                return
    with suppress(OSError):
        upstream.shutdown(socket.SHUT_WR)


def _forward_chunked(reader: _Reader, upstream: socket.socket) -> None:
    while True:
        size_line = reader.line()
        upstream.sendall(size_line + b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            while trailer := reader.line():
                upstream.sendall(trailer + b"\r\n")
            upstream.sendall(b"\r\n")
            return
        reader.forward(size + 2, upstream)


def _serve(client: socket.socket, upstream_path: str) -> None:
    with closing(client), closing(socket.socket(socket.AF_UNIX)) as upstream:
        try:
            upstream.connect(upstream_path)
        except OSError:
            return
        replies = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        replies.start()
        _forward_requests(client, upstream)
        replies.join()


def serve_forever(listen: str, upstream: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(listen)
    server = socket.socket(socket.AF_UNIX)
    server.bind(listen)
    os.chmod(listen, 0o660)
    server.listen(64)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_serve, args=(client, upstream), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="unix socket path to serve (use as DOCKER_HOST=unix://PATH)")
    parser.add_argument("--upstream", default="/var/run/docker.sock", help="dockerd's unix socket")
    args = parser.parse_args()
    serve_forever(args.listen, args.upstream)


if __name__ == "__main__":
    main()
