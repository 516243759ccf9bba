"""The GPU endpoint: quantfn behind the SageMaker inference container contract.

``GET /ping`` answers 200 once the default model is loaded (503 before), ``POST
/invocations`` takes the same JSON the API takes (embeddings by default; a
``"task": "rerank" | "classify"`` field picks another task) and returns the same
reply; ``/v1/embeddings``, ``/v1/rerank``, ``/v2/rerank`` and ``/v1/classify`` are
the same routes for local use; ``GET /stats`` shows the batching counters. It
serves the same models list as the functions (``QUANTFN_MODELS``), through the
same entry point (``quantfn.inference.run``), with the execution providers it
chose passed in; on CUDA the default model is replaced by its fp16 build
(``QUANTFN_GPU_MODEL``) when that build is present.

Concurrent requests are micro-batched per model: HTTP threads parse, check and
tokenize their own request, then queue its encodings; one worker per model
collects requests for up to ``QUANTFN_SERVER_BATCH_WAIT_MS`` or
``QUANTFN_SERVER_BATCH_MAX_TEXTS`` inputs, runs them as one ``forward`` and hands
each request its own rows. Padding is masked out, so an input's output does not
depend on its batch-mates. The queue is bounded: a full queue answers 503 at
once instead of letting latency grow without end.

The HTTP transport (``HttpServer``, ``RequestHandler``) knows nothing of models: it
reads bodies, bounds them and the time a client may take to send them, and always
answers with JSON. Its listen backlog (QUANTFN_SERVER_BACKLOG) absorbs bursts of
connections; requests beyond QUANTFN_SERVER_MAX_INFLIGHT get 503 ``server_busy``;
a bad ``Content-Length`` gets 400/413; no connection is closed without a reply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import numpy as np

from quantfn.config import ConfigError, Settings
from quantfn.errors import BadRequest, ModelUnavailable, QuantfnError, TooLarge
from quantfn.models.reference import parse_model_ref
from quantfn.registry import Registry
from quantfn.serialize import dumps
from quantfn.tasks import Encoded, Pipeline
from quantfn.wire import routes

logger = logging.getLogger("quantfn.gpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
JOB_TIMEOUT_S = 55.0  # SageMaker gives an invocation 60 s
_GET = routes.Route("GET")


class ServerBusy(QuantfnError):
    """The batching queue is full (503): the caller retries with backoff."""

    status = 503
    code = "server_busy"
    public_message = "The GPU endpoint is busy; retry shortly."


@dataclass(frozen=True)
class ModelChoice:
    """Which models and execution providers this container runs, and why (logged at start)."""

    models: tuple[tuple[str, str], ...]
    providers: tuple[str, ...]
    reason: str


def choose_model(settings: Settings, available: list[str]) -> ModelChoice:
    """CUDA with the default model's fp16 build when both exist; CUDA with the default; else all on CPU."""
    if settings.server.gpu_provider == "cuda" and CUDA not in available:
        raise ConfigError("QUANTFN_GPU_PROVIDER=cuda but onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu?)")
    models = settings.runtime.models
    if CUDA in available and settings.server.gpu_provider != "cpu":
        gpu = parse_model_ref(settings.server.gpu_model)
        if gpu.kind == "s3" or (settings.runtime.models_root / gpu.model_id / "manifest.json").is_file():
            default_name = models[0][0]
            served = ((default_name, settings.server.gpu_model), *models[1:])
            return ModelChoice(served, (CUDA, CPU), f"CUDA available: {default_name} served by {gpu} on CUDA")
        reason = f"CUDA available but no {gpu} (QUANTFN_GPU_MODEL): the models as configured, on CUDA"
        return ModelChoice(models, (CUDA, CPU), reason)
    why = "QUANTFN_GPU_PROVIDER=cpu" if settings.server.gpu_provider == "cpu" else "no CUDAExecutionProvider"
    return ModelChoice(models, (CPU,), f"{why}: the models as configured, on CPU")


_EMPTY_STATS = (
    "requests",
    "texts",
    "batches",
    "multi_request_batches",
    "max_batch_requests",
    "rejected_busy",
    "queued",
)


@dataclass
class _Job:
    encoded: Encoded
    done: threading.Event = field(default_factory=threading.Event)
    output: np.ndarray | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Collects queued requests for one model into batches for one worker thread; see the module docstring."""

    def __init__(self, forward: Any, wait_s: float, max_texts: int, queue_max: int) -> None:
        self._forward = forward
        self.wait_s, self.max_texts = wait_s, max_texts
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_max)
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "multi_request_batches": 0, "max_batch_requests": 0}
        self.stats["rejected_busy"] = 0
        self.pipeline: Any = None  # the pipeline whose forward this batcher runs (set by its owner)
        self._worker = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._worker.start()

    def submit(self, encoded: Encoded) -> np.ndarray:
        """Outputs for one request's encodings; ServerBusy when the queue is full or the wait is too long."""
        job = _Job(encoded)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count(rejected_busy=1)
            raise ServerBusy("batching queue full") from None
        if not job.done.wait(JOB_TIMEOUT_S):
            raise ServerBusy("request waited too long in the batching queue")
        if job.error is not None:
            raise job.error
        assert job.output is not None
        return job.output

    def snapshot(self) -> dict[str, int]:
        with self._stats_lock:
            return {**self.stats, "queued": self._queue.qsize()}

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self.stats[key] += value

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        batch, texts = [first], len(first.encoded.ids)
        deadline = time.monotonic() + self.wait_s
        while texts < self.max_texts:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if texts + len(job.encoded.ids) > self.max_texts:
                return batch, job  # it starts the next batch
            batch.append(job)
            texts += len(job.encoded.ids)
        return batch, None

    def _run(self) -> None:
        carried: _Job | None = None
        while True:
            first = carried or self._queue.get()
            batch, carried = self._collect(first)
            merged = Encoded.concat([job.encoded for job in batch])
            try:
                output = self._forward(merged)
            except BaseException as exc:  # every waiting request must hear about it
                for job in batch:
                    job.error = exc
            else:
                start = 0
                for job in batch:
                    job.output = output[start : start + len(job.encoded.ids)]
                    start += len(job.encoded.ids)
            with self._stats_lock:
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["texts"] += len(merged.ids)
                self.stats["multi_request_batches"] += len(batch) > 1
                self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(batch))
            for job in batch:
                job.done.set()


# ---- HTTP transport: connections, bodies, replies; nothing here knows about models ---------------------------


class HttpServer(ThreadingHTTPServer):
    """A thread per connection, a deep listen backlog, and a cap on requests in flight.

    Python's default backlog of 5 made the kernel reset connections in a burst (issue 14:
    89-123 of 200); with QUANTFN_SERVER_BACKLOG the kernel queues them, each gets a thread,
    and a POST beyond ``max_inflight`` is answered 503 ``server_busy`` at once.
    Subclasses implement ``respond(method, path, raw) -> (status, body)``.
    """

    daemon_threads = True
    allow_reuse_address = True
    #: A refused body up to this size is read and dropped before the 413 (see RequestHandler._read_body).
    discard_body_bytes: ClassVar[int] = 64 << 20

    def __init__(
        self, address: tuple[str, int], *, backlog: int, max_inflight: int, read_timeout_s: float, max_body_bytes: int
    ) -> None:
        self.request_queue_size = backlog  # read by server_activate(), inside super().__init__
        self.inflight = threading.BoundedSemaphore(max_inflight)
        self.read_timeout_s = read_timeout_s
        self.max_body_bytes = max_body_bytes
        super().__init__(address, RequestHandler)

    def respond(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError


class RequestHandler(BaseHTTPRequestHandler):
    """Reads one request (bounded in size and time), asks the server for the reply, always answers JSON."""

    server: HttpServer
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # so even a reply to a garbled request line has headers
    _DRAIN_BYTES: ClassVar[int] = 1 << 20

    def setup(self) -> None:
        self.timeout = self.server.read_timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()

    def do_GET(self) -> None:
        self._serve("GET", b"")

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is not None:
            self._serve("POST", raw)

    def _read_body(self) -> bytes | None:
        """The body, or None after replying 400/408/411/413 (the connection then closes, except after a 413 whose
        body was read to its end: ``discard_body_bytes``)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            error: QuantfnError = BadRequest("Send the body with a Content-Length.", code="length_required")
            self._refuse(HTTPStatus.LENGTH_REQUIRED, error)
            return None
        header = self.headers.get("Content-Length")
        if header is None:
            return b""
        if not header.strip().isdigit():
            shown = header[:40]
            self._refuse(400, BadRequest(f"Content-Length must be a whole number of bytes, got {shown!r}."))
            return None
        length = int(header)
        if length > self.server.max_body_bytes:
            # Most clients (http.client, requests, the SDKs) write the whole body before they read: answered
            # mid-send they see a broken pipe, not the 413. So a body up to the discard bound is read first.
            if length <= self.server.discard_body_bytes and self._discard(length):
                self._reply(413, self._too_large(length).to_body())
            else:
                self._refuse(413, self._too_large(length))
            return None
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            limit_s = self.server.read_timeout_s
            self._refuse(408, BadRequest(f"The body did not arrive within {limit_s:.0f} s.", code="request_timeout"))
            return None
        if len(raw) < length:  # the client hung up mid-body: nobody is left to answer
            self.close_connection = True
            return None
        return raw

    def _discard(self, length: int) -> bool:
        """Read and drop ``length`` body bytes within the read timeout; True if all of them arrived."""
        deadline = time.monotonic() + self.server.read_timeout_s
        left = length
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (TimeoutError, OSError):
            pass
        return left == 0

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` (curl, for large bodies): refuse an oversized body before it is sent."""
        header = self.headers.get("Content-Length", "")
        if header.strip().isdigit() and int(header) > self.server.max_body_bytes:
            self._refuse(413, self._too_large(int(header)))
            return False
        return super().handle_expect_100()

    def _too_large(self, length: int) -> TooLarge:
        limit = self.server.max_body_bytes
        message = f"The request body has {length} bytes; the limit is {limit} (QUANTFN_MAX_BODY_BYTES)."
        return TooLarge(message, code="body_too_large")

    def _serve(self, method: str, raw: bytes) -> None:
        if method == "POST" and not self.server.inflight.acquire(blocking=False):
            self._reply(503, ServerBusy("too many requests in flight (QUANTFN_SERVER_MAX_INFLIGHT)").to_body())
            return
        try:
            status, body = self.server.respond(method, self.path, raw)
        except QuantfnError as error:
            log = logger.info if error.status < 500 else logger.warning
            log("refused %s: %s", error.status, error.message)
            status, body = error.status, error.to_body()
        except RecursionError:  # json.loads on a body nested thousands deep
            status, body = 400, BadRequest("The request body is nested too deeply.").to_body()
        except Exception:
            logger.exception("unexpected error")
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, QuantfnError("unexpected").to_body()
        finally:
            if method == "POST":
                self.server.inflight.release()
        self._reply(status, body)

    def _refuse(self, status: int, error: QuantfnError) -> None:
        """Reply, then close gracefully: unread request bytes left at close() would make the kernel send a reset."""
        self._reply(status, error.to_body(), close=True)
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            drained = 0
            while drained < self._DRAIN_BYTES:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long) in the JSON error shape."""
        error = BadRequest(f"HTTP {code}: {message or HTTPStatus(code).phrase}."[:200], code="bad_http_request")
        self._reply(code, error.to_body(), close=True)

    def _reply(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        try:
            data = dumps(body).encode()
        except (TypeError, ValueError):  # orjson refuses lone surrogates; json escapes them
            data = json.dumps(body, ensure_ascii=True).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left before its answer
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


class EndpointServer(HttpServer):
    """The model side: load, /ping, /stats, the task routes; the transport is HttpServer's."""

    def __init__(self, settings: Settings, choice: ModelChoice) -> None:
        self.settings = settings
        self.choice = choice
        # The registry gets the chosen models and providers: nothing of it is subclassed or patched.
        self.registry = Registry(settings, providers=choice.providers, models=choice.models)
        self._batchers: dict[str, MicroBatcher] = {}
        self._batchers_lock = threading.Lock()
        self.ready = threading.Event()
        self.load_error: str | None = None
        super().__init__(
            (settings.server.host, settings.server.port),
            backlog=settings.server.backlog,
            max_inflight=settings.server.max_inflight,
            read_timeout_s=settings.server.read_timeout_ms / 1000,
            max_body_bytes=settings.limits.max_body_bytes,
        )

    def respond(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/ping":
            ready = self.ready.is_set()
            status = {"status": "ok" if ready else "loading", "model_choice": self.choice.reason}
            status["providers"] = self.active_providers
            status["models"] = [name for name, _ in self.choice.models]
            status["stats"] = self.stats()
            return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), status
        if method == "GET" and path == "/stats":
            return HTTPStatus.OK, self.stats()
        if method != "POST" or (path != "/invocations" and routes.ROUTES.get(path, _GET).method != "POST"):
            raise BadRequest(f"No route for {method} {path[:100]}.", code="not_found")
        if not self.ready.is_set():
            raise ModelUnavailable(self.load_error or "model is still loading")
        # The route table answers, through the same entry point as the functions; this server adds its batching.
        options = {"remaining_ms": JOB_TIMEOUT_S * 1000, "registry": self.registry, "forward": self._forward}
        if path == "/invocations":
            reply = routes.invocation(raw, **options)
        else:
            reply = routes.respond("POST", path, lambda: raw, allow_endpoint=False, **options)
        if reply.status >= 400:  # the same record the API function writes, as one log line
            level, message, fields = reply.record()
            getattr(logger, level)("%s %s", message, json.dumps(fields, default=str), exc_info=reply.unexpected)
        return reply.status, reply.body

    @property
    def active_providers(self) -> list[str]:
        pipeline = self.registry.default.pipeline
        return list(pipeline.session.get_providers()) if pipeline is not None else []

    def stats(self) -> dict[str, Any]:
        with self._batchers_lock:
            per_model = {name: batcher.snapshot() for name, batcher in self._batchers.items()}
        keys = next(iter(per_model.values()), None) or _EMPTY_STATS  # zeros before the first request
        totals = {key: sum(s[key] for s in per_model.values()) for key in keys}
        return {**totals, "models": per_model}

    def load(self) -> None:
        """Load and warm the default model (run in a thread: /ping says 503 until it is done)."""
        try:
            started = time.perf_counter()
            default = self.registry.default
            pipeline = self.registry.pipeline(default)
            pipeline.forward(pipeline.encode(["warm up the session"]))
            manifest = pipeline.manifest
            logger.info(
                "model ready: %s (%s) as %s on %s in %.0f ms",
                manifest.model_id,
                manifest.recipe or "?",
                default.name,
                ",".join(self.active_providers),
                (time.perf_counter() - started) * 1000,
            )
            self.ready.set()
        except QuantfnError as exc:
            self.load_error = exc.message
            logger.error("model failed to load: %s", exc.message)

    def _forward(self, pipeline: Pipeline, encoded: Encoded) -> np.ndarray:
        """The batching forward: requests for the same model share one ``pipeline.forward``."""
        with self._batchers_lock:
            batcher = self._batchers.get(pipeline.manifest.model_id)
            if batcher is None or batcher.pipeline is not pipeline:  # a reloaded model gets a fresh batcher
                settings = self.settings
                batcher = MicroBatcher(
                    pipeline.forward,
                    settings.server.batch_wait_ms / 1000,
                    settings.server.batch_max_texts,
                    settings.server.queue_max,
                )
                batcher.pipeline = pipeline
                self._batchers[pipeline.manifest.model_id] = batcher
        return batcher.submit(encoded)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM. ``serve`` (SageMaker's argument) is accepted and ignored."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    import onnxruntime as ort

    settings = Settings.from_env()
    choice = choose_model(settings, ort.get_available_providers())
    logger.info("model choice: %s (providers %s)", choice.reason, ",".join(choice.providers))
    server = EndpointServer(settings, choice)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    threading.Thread(target=server.load, name="model-load", daemon=True).start()
    host, port = server.server_address[:2]
    logger.info("listening on %s:%s", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
