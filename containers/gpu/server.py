"""The GPU endpoint: quantfn behind the SageMaker inference container contract.

``GET /ping`` answers 200 once the model is loaded (503 before), ``POST /invocations``
takes and returns the OpenAI embeddings JSON the API function uses (``/v1/embeddings``
is the same route, for local use), ``GET /stats`` shows the batching counters.

Concurrent requests are micro-batched: HTTP threads tokenize and check their own
request, then queue it; one worker collects requests for up to
``QUANTFN_SERVER_BATCH_WAIT_MS`` or ``QUANTFN_SERVER_BATCH_MAX_TEXTS`` texts, runs them
as one ``EmbeddingModel.embed`` call and hands each request its own rows. Padding is
masked out, so a text's embedding does not depend on its batch-mates. The queue is
bounded: a full queue answers 503 at once instead of letting latency grow without end.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from quantfn.config import ConfigError, Settings
from quantfn.errors import BadRequest, ModelUnavailable, QuantfnError
from quantfn.models.reference import parse_model_ref
from quantfn.models.session import open_session
from quantfn.openai_compat import embeddings_response, load_json_body, parse_embeddings_request
from quantfn.serialize import dumps
from quantfn.service import EmbeddingService
from quantfn.tasks.embedding import EmbeddingModel, Tokenized, load_tokenizer

logger = logging.getLogger("quantfn.gpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
JOB_TIMEOUT_S = 55.0  # SageMaker gives an invocation 60 s


class ServerBusy(QuantfnError):
    """The batching queue is full (503): the caller retries with backoff."""

    status = 503
    code = "server_busy"
    public_message = "The GPU endpoint is busy; retry shortly."


@dataclass(frozen=True)
class ModelChoice:
    """Which model and execution providers this container runs, and why (logged at start)."""

    model: str
    providers: tuple[str, ...]
    reason: str


def choose_model(settings: Settings, available: list[str]) -> ModelChoice:
    """CUDA with the fp16 variant when both exist; CUDA with the default model; else the default model on CPU."""
    if settings.gpu_provider == "cuda" and CUDA not in available:
        raise ConfigError("QUANTFN_GPU_PROVIDER=cuda but onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu?)")
    if CUDA in available and settings.gpu_provider != "cpu":
        gpu = parse_model_ref(settings.gpu_model)
        if gpu.kind == "s3" or (settings.models_root / gpu.model_id / "manifest.json").is_file():
            return ModelChoice(settings.gpu_model, (CUDA, CPU), f"CUDA available: GPU model {gpu} on CUDA")
        return ModelChoice(
            settings.model, (CUDA, CPU), f"CUDA available but no {gpu} (QUANTFN_GPU_MODEL): default model on CUDA"
        )
    why = "QUANTFN_GPU_PROVIDER=cpu" if settings.gpu_provider == "cpu" else "no CUDAExecutionProvider"
    return ModelChoice(settings.model, (CPU,), f"{why}: default model on CPU")


class GpuEmbeddingService(EmbeddingService):
    """The quantfn service with its session opened on the chosen execution providers."""

    def __init__(self, settings: Settings, providers: tuple[str, ...]) -> None:
        super().__init__(settings)
        self.providers = providers
        self.active_providers: list[str] = []

    def model(self) -> EmbeddingModel:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    local = self.local_model()
                    path = local.path / "model.onnx"
                    session = open_session(path, local.manifest, self.settings.threads, self.providers)
                    self.active_providers = list(session.get_providers())
                    tokenizer = load_tokenizer(local.path / "tokenizer.json")
                    self._model = EmbeddingModel(session, tokenizer, local.manifest, self.settings.batch_size)
        return self._model


@dataclass
class _Job:
    tokens: Tokenized
    done: threading.Event = field(default_factory=threading.Event)
    vectors: np.ndarray | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Collects queued requests into batches for one worker thread; see the module docstring."""

    def __init__(self, encode: Any, wait_s: float, max_texts: int, queue_max: int) -> None:
        self._encode = encode
        self.wait_s, self.max_texts = wait_s, max_texts
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_max)
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "multi_request_batches": 0, "max_batch_requests": 0}
        self.stats["rejected_busy"] = 0
        self._worker = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._worker.start()

    def submit(self, tokens: Tokenized) -> np.ndarray:
        """Embeddings for one request's tokens; ServerBusy when the queue is full or the wait is too long."""
        job = _Job(tokens)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count(rejected_busy=1)
            raise ServerBusy("batching queue full") from None
        if not job.done.wait(JOB_TIMEOUT_S):
            raise ServerBusy("request waited too long in the batching queue")
        if job.error is not None:
            raise job.error
        assert job.vectors is not None
        return job.vectors

    def snapshot(self) -> dict[str, int]:
        with self._stats_lock:
            return {**self.stats, "queued": self._queue.qsize()}

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self.stats[key] += value

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        batch, texts = [first], len(first.tokens.ids)
        deadline = time.monotonic() + self.wait_s
        while texts < self.max_texts:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if texts + len(job.tokens.ids) > self.max_texts:
                return batch, job  # it starts the next batch
            batch.append(job)
            texts += len(job.tokens.ids)
        return batch, None

    def _run(self) -> None:
        carried: _Job | None = None
        while True:
            first = carried or self._queue.get()
            batch, carried = self._collect(first)
            ids = [seq for job in batch for seq in job.tokens.ids]
            try:
                vectors = self._encode(Tokenized(ids))
            except BaseException as exc:  # every waiting request must hear about it
                for job in batch:
                    job.error = exc
            else:
                start = 0
                for job in batch:
                    job.vectors = vectors[start : start + len(job.tokens.ids)]
                    start += len(job.tokens.ids)
            with self._stats_lock:
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["texts"] += len(ids)
                self.stats["multi_request_batches"] += len(batch) > 1
                self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(batch))
            for job in batch:
                job.done.set()


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings: Settings, choice: ModelChoice) -> None:
        self.settings = settings
        self.choice = choice
        self.service = GpuEmbeddingService(settings, choice.providers)
        self.batcher = MicroBatcher(
            lambda tokens: self.service.model().embed(tokens),
            settings.server_batch_wait_ms / 1000,
            settings.server_batch_max_texts,
            settings.server_queue_max,
        )
        self.ready = threading.Event()
        self.load_error: str | None = None
        super().__init__((settings.server_host, settings.server_port), RequestHandler)

    def load(self) -> None:
        """Load and warm the model (run in a thread: /ping says 503 until it is done)."""
        try:
            started = time.perf_counter()
            encoder = self.service.model()
            encoder.embed(encoder.tokenize(["warm up the session"]))
            manifest = encoder.manifest
            logger.info(
                "model ready: %s (%s) on %s in %.0f ms",
                manifest.model_id,
                manifest.raw.get("quantization", {}).get("recipe", "?"),
                ",".join(self.service.active_providers),
                (time.perf_counter() - started) * 1000,
            )
            self.ready.set()
        except QuantfnError as exc:
            self.load_error = exc.message
            logger.error("model failed to load: %s", exc.message)

    def embed(self, raw: bytes) -> dict[str, Any]:
        """One invocation: validate, tokenize, batch, shape the reply; raises QuantfnError."""
        if not self.ready.is_set():
            raise ModelUnavailable(self.load_error or "model is still loading")
        settings = self.settings
        request = parse_embeddings_request(load_json_body(raw, settings.max_body_bytes), settings.max_inputs)
        self.service.check_model(request.model)
        manifest = self.service.manifest()
        if request.dimensions is not None and request.dimensions != manifest.dimensions:
            raise BadRequest(f"'dimensions' must be {manifest.dimensions} for this model.", param="dimensions")
        tokens = self.service.tokenize_checked(request.texts)
        vectors = self.batcher.submit(tokens)
        return embeddings_response(vectors, manifest.model_id, sum(tokens.counts), request.encoding_format)


class RequestHandler(BaseHTTPRequestHandler):
    server: EndpointServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/ping":
            ready = self.server.ready.is_set()
            body = {"status": "ok" if ready else "loading", "model_choice": self.server.choice.reason}
            body["providers"] = self.server.service.active_providers
            body["stats"] = self.server.batcher.snapshot()
            self._reply(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif self.path == "/stats":
            self._reply(HTTPStatus.OK, self.server.batcher.snapshot())
        else:
            self._reply(HTTPStatus.NOT_FOUND, BadRequest(f"No route for GET {self.path}.", code="not_found").to_body())

    def do_POST(self) -> None:
        if self.path not in ("/invocations", "/v1/embeddings"):
            self._reply(HTTPStatus.NOT_FOUND, BadRequest(f"No route for POST {self.path}.", code="not_found").to_body())
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            self._reply(HTTPStatus.OK, self.server.embed(raw))
        except QuantfnError as error:
            log = logger.info if error.status < 500 else logger.warning
            log("refused %s: %s", error.status, error.message)
            self._reply(error.status, error.to_body())
        except Exception:
            logger.exception("unexpected error")
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, QuantfnError("unexpected").to_body())

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


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
