"""The served models, by name: manifests without sessions, pipelines on first use, a memory budget.

``QUANTFN_MODELS`` lists the models (the first is the default). A request's
``model`` resolves against each model's configured name, its model id, its
upstream name (and that name's last part) and, for the default, the configured
aliases. Resolving needs only manifests, so an unknown model (404) or a model of
the wrong task for the route (400) never creates a session. Pipelines load
lazily and independently; together they stay within ``QUANTFN_MODEL_MEMORY_MB``,
the least recently used dropped first. A model that fails to load is forgotten
(pipeline, manifest and verified files), answers 503, shows as unavailable, and
is tried afresh on a later request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from quantfn.config import Settings, get_settings
from quantfn.errors import BadRequest, ModelNotFound, ModelUnavailable, QuantfnError, echo, safe_reason
from quantfn.models.manifest import Manifest
from quantfn.models.reference import ModelRef, parse_model_ref
from quantfn.models.store import ModelStore
from quantfn.tasks import Pipeline, Task, open_pipeline, parallel_mode
from quantfn.tasks.base import tokenizer_from_json
from quantfn.tasks.embed import served_types

logger = logging.getLogger(__name__)


def estimate_memory_bytes(manifest: Manifest, sessions: int = 1) -> int:
    """What a loaded pipeline holds: the manifest's measured ``memory_bytes``, else an estimate from its files.

    int8 weights dequantized at load take four times their file size, and onnxruntime keeps a prepacked
    copy of the projections; the tokenizer's structures take a few times its JSON. ``sessions``: how many
    sessions of ``model.onnx`` the pipeline may open (2 under ``parallelism="auto"``; the default model's
    second one measured 33 MB, a file's size and a half). A cascade's second graph has one session.
    """
    measured = manifest.raw.get("memory_bytes")
    if isinstance(measured, int) and measured > 0:
        return measured
    graphs = [(manifest.session, "model.onnx", sessions)]
    if manifest.cascade:
        graphs.append((manifest.cascade.session, manifest.cascade.file, 1))
    total = 3 * manifest.files["tokenizer.json"].size
    for graph, file, opened in graphs:
        weights = graph.dequantize_at_load.file if graph.dequantize_at_load else None
        total += (2 * manifest.files[file].size + (9 * manifest.files[weights].size if weights else 0)) * opened
    return total


@dataclass
class ServedModel:
    """One configured model: its name, reference and what is known of it so far."""

    name: str
    ref: ModelRef
    manifest: Manifest | None = None
    tokenizer: Any = None
    pipeline: Pipeline | None = None
    memory_bytes: int = 0
    error: str = ""  # the last load failure, shown by /health and /v1/models until a load succeeds
    load_phases_ms: dict[str, float] = field(default_factory=dict)
    # Held while this model is fetched or loaded: other models' requests do not wait for it.
    load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None


class Registry:
    """The models this function serves; safe across threads (the GPU container runs many)."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        models: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or ModelStore(settings)
        self.providers = tuple(providers)
        self.models = [ServedModel(name, parse_model_ref(ref)) for name, ref in (models or settings.runtime.models)]
        self._lock = threading.RLock()
        self._lru: OrderedDict[str, ServedModel] = OrderedDict()  # loaded models, least recently used first
        self._endpoint: Any = None  # the GPU endpoint client, made on first use

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    # -- manifests (cheap: no session) -------------------------------------------------------------------
    def manifest(self, model: ServedModel) -> Manifest:
        """The model's manifest, read once (a layer file or one small S3 object)."""
        if model.manifest is None:
            manifest = self.store.read_manifest(model.ref)
            with self._lock:
                model.manifest = model.manifest or manifest
        return model.manifest

    def names(self, model: ServedModel) -> list[str]:
        """Every name a request may use for ``model``."""
        manifest = self.manifest(model)
        names = [model.name, manifest.model_id]
        if manifest.upstream:
            names += [manifest.upstream, manifest.upstream.rsplit("/", 1)[-1]]
        if model is self.default:
            names += list(self.settings.runtime.model_aliases)
        return list(dict.fromkeys(names))

    def resolve(self, name: str | None, task: Task) -> ServedModel:
        """The served model for a request's ``model`` on a route of ``task`` (a model whose manifest
        task is one of ``task.serves``).

        ``None`` picks the first served model that can do the task. Unknown: ModelNotFound (404);
        the wrong task: BadRequest (400); a manifest that cannot be read: ModelUnavailable (503).
        """
        accepted = task.serves
        task_name = task.name
        if name is None:
            for model in self.models:
                if self._readable(model) and self.manifest(model).task in accepted:
                    return model
            self._raise_if_unreadable()
            raise BadRequest(f"No served model can do {task_name}; name one with 'model'.", param="model")
        model = next((m for m in self.models if m.name == name), None)
        unreadable: list[str] = []
        for candidate in self.models if model is None else ():
            if not self._readable(candidate):
                unreadable.append(candidate.name)
            elif name in self.names(candidate):
                model = candidate
                break
        if model is None and unreadable:  # the name may be one of theirs: not known to be unknown
            missing = ", ".join(unreadable)
            raise ModelUnavailable(f"cannot tell whether {echo(name)} is served: no manifest for {missing}")
        if model is None:
            self._raise_if_unreadable()
            raise ModelNotFound(
                f"The model {echo(name)} is not served here; available: {', '.join(m.name for m in self.models)}.",
                param="model",
            )
        manifest = self.manifest(model)
        if manifest.task not in accepted:
            able = [m.name for m in self.models if self._readable(m) and self.manifest(m).task in accepted]
            raise BadRequest(
                f"The model {echo(name)} is a model for {manifest.task}, not {task_name}; "
                f"models that can: {', '.join(able) or 'none'}.",
                param="model",
                code="wrong_model_task",
            )
        return model

    def _raise_if_unreadable(self) -> None:
        """A model whose manifest cannot be read may be the one asked for: 503 (retry), not a false 404 or 400."""
        unreadable = next((m for m in self.models if m.manifest is None and m.error), None)
        if unreadable is not None:
            raise ModelUnavailable(unreadable.error)

    def _readable(self, model: ServedModel) -> bool:
        """Whether the manifest can be read now; a model whose manifest cannot is skipped by name lookups."""
        try:
            self.manifest(model)
            return True
        except ModelUnavailable as exc:
            logger.warning("model %s: manifest unavailable: %s", model.name, safe_reason(exc.message))
            model.error = exc.message
            return False

    # -- tokenizer and pipeline ----------------------------------------------------------------------------
    def tokenizer(self, model: ServedModel) -> Any:
        """The model's tokenizer, without a session or its weights (the router counts tokens before deciding
        where to run: a request sent to the GPU endpoint never fetches an S3 model's weights)."""
        pipeline = model.pipeline
        if pipeline is not None:
            return pipeline.tokenizer
        with model.load_lock:
            if model.tokenizer is None:
                started = time.perf_counter()
                try:
                    model.manifest, data = self.store.read_verified(model.ref, "tokenizer.json")
                except QuantfnError as exc:
                    model.error = exc.message
                    raise
                model.tokenizer = self._guard(model, lambda: tokenizer_from_json(data.decode("utf-8")))
                model.load_phases_ms["tokenizer"] = (time.perf_counter() - started) * 1000
            return model.tokenizer

    def pipeline(self, model: ServedModel) -> Pipeline:
        """The loaded pipeline; the first call fetches, verifies and opens the session within the budget."""
        pipeline = model.pipeline
        if pipeline is None:
            tokenizer = self.tokenizer(model)
            with model.load_lock:
                if model.pipeline is None:
                    self._load(model, tokenizer)
                pipeline = model.pipeline
        with self._lock:
            if model.name in self._lru:
                self._lru.move_to_end(model.name)
        return pipeline

    def _load(self, model: ServedModel, tokenizer: Any) -> None:
        local = self._fetch(model)
        settings = self.settings
        auto = parallel_mode(settings.runtime.parallelism, settings.runtime.threads, self.providers) == "auto"
        need = estimate_memory_bytes(local.manifest, sessions=2 if auto else 1)
        budget = self.settings.runtime.model_memory_bytes
        if need > budget:
            raise ModelUnavailable(
                f"model {model.name} needs about {need // 2**20} MB loaded, over the budget of {budget // 2**20} MB "
                "(QUANTFN_MODEL_MEMORY_MB; raise the function's memory)"
            )
        with self._lock:
            while self._lru and sum(m.memory_bytes for m in self._lru.values()) + need > budget:
                _, evicted = self._lru.popitem(last=False)
                logger.info("dropping model %s (least recently used) to load %s", evicted.name, model.name)
                evicted.pipeline = None  # a request still running on it keeps its own reference
                evicted.memory_bytes = 0
        started = time.perf_counter()
        model.pipeline = self._guard(
            model,
            lambda: open_pipeline(
                local.path,
                local.manifest,
                settings.runtime.threads,
                settings.runtime.batch_size,
                self.providers,
                tokenizer,
                settings.runtime.parallelism,
            ),
        )
        model.load_phases_ms["session"] = (time.perf_counter() - started) * 1000
        model.memory_bytes = need
        model.error = ""
        with self._lock:
            self._lru[model.name] = model

    def _fetch(self, model: ServedModel) -> Any:
        started = time.perf_counter()
        try:
            local = self.store.fetch(model.ref)
        except QuantfnError as exc:
            model.error = exc.message
            raise
        model.load_phases_ms.setdefault("fetch", (time.perf_counter() - started) * 1000)
        model.manifest = local.manifest
        return local

    def _guard(self, model: ServedModel, load: Any) -> Any:
        """Run a load step; on any failure forget the model entirely and answer 503 (tried again next time)."""
        try:
            return load()
        except Exception as exc:
            # The error (shown by /health and /v1/models) names the failure's kind; the log alone has the
            # library's own text, which may hold paths.
            detail = f"model {model.name} failed to load: {exc.__class__.__name__}"
            logger.error("%s: %s", detail, safe_reason(str(exc)))
            self.forget(model)
            model.error = detail
            raise ModelUnavailable(detail) from exc

    def forget(self, model: ServedModel) -> None:
        """Drop the model's pipeline, tokenizer, manifest and verified files."""
        with self._lock:
            self._lru.pop(model.name, None)
            model.pipeline = model.tokenizer = model.manifest = None
            model.memory_bytes = 0
            model.load_phases_ms.clear()
            self.store.forget(model.ref)

    def endpoint_client(self) -> Any:
        """The GPU endpoint client, made on first use and kept (its circuit breaker lives as long as the registry)."""
        with self._lock:
            if self._endpoint is None:
                from quantfn.endpoint import EndpointClient

                self._endpoint = EndpointClient(self.settings)
            return self._endpoint

    def load_ms(self, model: ServedModel) -> float:
        return sum(model.load_phases_ms.values())

    # -- what /health and /v1/models show ------------------------------------------------------------------
    def describe(self, model: ServedModel) -> dict[str, Any]:
        """A model's facts from its manifest (no session), with whether it is loaded and healthy."""
        facts: dict[str, Any] = {"name": model.name, "source": model.ref.kind, "loaded": model.loaded}
        try:
            manifest = self.manifest(model)
        except ModelUnavailable as exc:
            model.error = exc.message
        else:
            facts |= {
                "model_id": manifest.model_id,
                "task": manifest.task,
                "max_tokens": manifest.max_sequence_length,
                "recipe": manifest.recipe,
            }
            if manifest.task == "embed":
                facts["dimensions"] = manifest.dimensions
                facts["matryoshka_dimensions"] = list(manifest.matryoshka_dimensions)
                facts["embedding_types"] = served_types(manifest)
            if manifest.labels:
                facts["labels"] = list(manifest.labels)
        facts["status"] = "unavailable" if model.error else "ok"
        return facts

    @property
    def loaded_bytes(self) -> int:
        return sum(m.memory_bytes for m in self._lru.values())


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, made on first use from ``get_settings()``."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = Registry(get_settings())
    return _registry


def reset_registry() -> None:
    """Forget the process-wide registry and settings (tests change the environment)."""
    global _registry
    with _registry_lock:
        _registry = None
    get_settings.cache_clear()
