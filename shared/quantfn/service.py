"""The embedding service: one model, loaded lazily, shared by every trigger.

``get_service()`` is the process-wide instance (created on first use, reused
for the life of the execution environment); ``reset_service()`` is for tests.
The service takes and returns plain values; handlers own the wire formats.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.config import Settings, get_settings
from quantfn.errors import BadRequest, ModelNotFound, QuantfnError, TooLarge
from quantfn.models.manifest import Manifest
from quantfn.models.reference import parse_model_ref
from quantfn.models.session import open_session
from quantfn.models.store import LocalModel, ModelStore
from quantfn.tasks.embedding import EmbeddingModel, Tokenized, load_tokenizer

if TYPE_CHECKING:
    from quantfn.endpoint import EndpointClient
    from quantfn.openai_compat import EmbeddingRequest
    from quantfn.routing import RoutePlan


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray
    model: str
    token_counts: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    route: RoutePlan | None = None  # set by embed_routed: where it ran and why

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


class EmbeddingService:
    """Embeds texts with the configured model; enforces the request limits."""

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.ref = parse_model_ref(settings.model)
        self.store = store or ModelStore(settings)
        self._lock = threading.Lock()
        self._model: EmbeddingModel | None = None
        self._local: LocalModel | None = None
        #: Cold-path phases in ms: fetch (S3 download or layer read, sha256 verification), session, tokenizer.
        self.load_phases_ms: dict[str, float] = {}

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def local_model(self) -> LocalModel:
        """The verified model folder (fetched from S3 on first use)."""
        if self._local is None:
            started = time.perf_counter()
            self._local = self.store.fetch(self.ref)
            self.load_phases_ms["fetch"] = (time.perf_counter() - started) * 1000
        return self._local

    def manifest(self) -> Manifest:
        return self.local_model().manifest

    def model(self) -> EmbeddingModel:
        """The loaded encoder; the first call fetches, verifies and opens the session."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    local = self.local_model()
                    started = time.perf_counter()
                    session = open_session(local.path / "model.onnx", local.manifest, self.settings.threads)
                    self.load_phases_ms["session"] = (time.perf_counter() - started) * 1000
                    tokenizer = self._load_tokenizer()
                    self._model = EmbeddingModel(session, tokenizer, local.manifest, self.settings.batch_size)
        return self._model

    @property
    def load_ms(self) -> float | None:
        """Total cold-path model load time, or None before the model is loaded."""
        return sum(self.load_phases_ms.values()) if self._model is not None else None

    def served_names(self) -> list[str]:
        """Names a request may use for this model: its id, its upstream name, and configured aliases."""
        manifest = self.manifest()
        names = [manifest.model_id]
        upstream = str(manifest.raw.get("source", {}).get("upstream", ""))
        if upstream:
            names += [upstream, upstream.rsplit("/", 1)[-1]]
        names += list(self.settings.model_aliases)
        return list(dict.fromkeys(names))

    def check_model(self, name: str) -> None:
        if name not in self.served_names():
            raise ModelNotFound(
                f"The model '{name}' is not served here; available: {', '.join(self.served_names())}.", param="model"
            )

    def tokenize_checked(self, texts: list[str]) -> Tokenized:
        """Tokenize and apply the token limits (413 naming the input and the limit)."""
        tokens = self.model().tokenize(texts)
        limit = self.settings.max_input_tokens
        for index, count in enumerate(tokens.counts):
            if count > limit:
                raise TooLarge(
                    f"'input[{index}]' has {count} tokens; the limit is {limit} per input (QUANTFN_MAX_INPUT_TOKENS).",
                    param=f"input[{index}]",
                    code="input_too_long",
                )
        total, total_limit = sum(tokens.counts), self.settings.max_total_tokens
        if total > total_limit:
            raise TooLarge(
                f"The request has {total} tokens in all; the limit is {total_limit} (QUANTFN_MAX_TOTAL_TOKENS). "
                "Split the request.",
                param="input",
                code="too_many_tokens",
            )
        return tokens

    def embed(self, texts: list[str], model: str, dimensions: int | None = None) -> EmbeddingResult:
        """Embed ``texts`` (already validated for shape) with the model named ``model``."""
        cold = self._model is None
        self.check_model(model)  # needs only the manifest: a wrong name never loads the session
        encoder = self.model()
        if dimensions is not None and dimensions != encoder.dimensions:
            raise BadRequest(
                f"'dimensions' must be {encoder.dimensions} for model {encoder.manifest.model_id}; "
                "this model cannot shorten its embeddings.",
                param="dimensions",
            )
        started = time.perf_counter()
        tokens = self.tokenize_checked(texts)
        tokenized = time.perf_counter()
        vectors = encoder.embed(tokens)
        done = time.perf_counter()
        timings = {"tokenize_ms": (tokenized - started) * 1000, "inference_ms": (done - tokenized) * 1000}
        if cold and self.load_ms is not None:
            timings["model_load_ms"] = self.load_ms
        return EmbeddingResult(vectors, encoder.manifest.model_id, tokens.counts, timings)

    # -- the GPU route (routing.py decides, endpoint.py calls) ----------------------------------------------
    _tokenizer: Any = None  # a tokenizer of its own, so a request routed away never opens the session
    _endpoint: EndpointClient | None = None

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Token ids (untruncated), with the loaded model's tokenizer or, before it loads, the tokenizer alone."""
        if self._model is not None:
            return self._model.tokenize(texts)
        return Tokenized([encoding.ids for encoding in self._load_tokenizer().encode_batch(texts)])

    def _load_tokenizer(self) -> Any:
        """The model's tokenizer, loaded once whether the router or the session asks first."""
        if self._tokenizer is None:
            started = time.perf_counter()
            self._tokenizer = load_tokenizer(self.local_model().path / "tokenizer.json")
            self.load_phases_ms["tokenizer"] = (time.perf_counter() - started) * 1000
        return self._tokenizer

    def endpoint(self) -> EndpointClient:
        """The GPU endpoint client (lazy; its circuit breaker lives as long as the execution environment)."""
        if self._endpoint is None:
            from quantfn.endpoint import EndpointClient

            self._endpoint = EndpointClient(self.settings)
        return self._endpoint

    def embed_routed(
        self, request: EmbeddingRequest, *, payload_bytes: int, remaining_ms: float | None
    ) -> EmbeddingResult:
        """Plan the route (size limits included), then embed here or on the GPU endpoint.

        The result carries the plan. A refused plan raises its 413; any QuantfnError raised
        after the plan carries it in ``error.route``. ``remaining_ms``: the function's time left.
        """
        from quantfn.routing import ENDPOINT, ENDPOINT_RESERVE_MS, REFUSE, plan_route

        started = time.monotonic()
        self.check_model(request.model)
        manifest = self.manifest()
        if request.dimensions is not None and request.dimensions != manifest.dimensions:
            raise BadRequest(
                f"'dimensions' must be {manifest.dimensions} for model {manifest.model_id}; "
                "this model cannot shorten its embeddings.",
                param="dimensions",
            )
        tokenized: list[Tokenized] = []
        timings: dict[str, float] = {}

        def token_counts() -> list[int]:
            before = time.perf_counter()
            tokenized.append(self.tokenize(request.texts))
            timings["tokenize_ms"] = (time.perf_counter() - before) * 1000
            return tokenized[0].counts

        cold = self._model is None
        plan = plan_route(
            inputs=len(request.texts),
            payload_bytes=payload_bytes,
            encoding_format=request.encoding_format,
            dimensions=manifest.dimensions,
            max_length=manifest.max_sequence_length,
            token_counts=token_counts,
            remaining_ms=remaining_ms,
            cold=cold,
            settings=self.settings,
        )
        try:
            if plan.route == REFUSE:
                raise plan.refusal()
            tokens = tokenized[0] if tokenized else self.tokenize(request.texts)  # usage counts, tokenized once
            if plan.route == ENDPOINT:
                budget_ms = min(self.settings.api_timeout_ms, remaining_ms if remaining_ms is not None else 1e12)
                upstream = str(manifest.raw.get("source", {}).get("upstream", "")) or manifest.model_id
                reply = self.endpoint().embed(
                    request.texts,
                    upstream,  # the name every container serving this model family answers to
                    dimensions=manifest.dimensions,
                    normalized=manifest.normalize,
                    deadline_s=started + (budget_ms - ENDPOINT_RESERVE_MS) / 1000,
                )
                timings["endpoint_ms"] = reply.elapsed_ms
                return EmbeddingResult(reply.vectors, manifest.model_id, tokens.counts, timings, route=plan)
            encoder = self.model()
            before = time.perf_counter()
            vectors = encoder.embed(tokens)
            timings["inference_ms"] = (time.perf_counter() - before) * 1000
            if cold and self.load_ms is not None:
                timings["model_load_ms"] = self.load_ms
            return EmbeddingResult(vectors, manifest.model_id, tokens.counts, timings, route=plan)
        except QuantfnError as error:
            error.route = plan
            raise

    def describe(self) -> dict[str, Any]:
        """Health facts that need no model load."""
        return {"model": self.ref.model_id, "source": self.ref.kind, "loaded": self.loaded}


_service: EmbeddingService | None = None
_service_lock = threading.Lock()


def get_service() -> EmbeddingService:
    """The process-wide service, created on first use from ``get_settings()``."""
    global _service
    if _service is None:
        with _service_lock:
            if _service is None:
                _service = EmbeddingService(get_settings())
    return _service


def reset_service() -> None:
    """Forget the process-wide service and settings (tests change the environment)."""
    global _service
    with _service_lock:
        _service = None
    get_settings.cache_clear()
