"""Settings: every environment variable quantfn reads, parsed once into a frozen object of seven groups.

``runtime`` (models, threads, caches), ``limits`` (what one request may ask, and the cost
model that decides whether it runs in time), ``endpoint`` (the GPU route), ``batch`` (SQS
jobs), ``server`` (the GPU container), ``auth`` (API keys) and ``build`` (the model build). Each field names its
variable and its default once, in the ``_setting`` call that declares it; ``from_env`` reads
them all from those declarations. Every variable is documented in the README's configuration
table (a test holds the two together). ``get_settings()`` caches the parsed object for the
life of the execution environment; tests call ``get_settings.cache_clear()`` after changing the env.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from quantfn.errors import QuantfnError

DEFAULT_MODEL = "layer:all-minilm-l6-v2"
DEFAULT_GPU_MODEL = "layer:all-minilm-l6-v2-fp16"
LAMBDA_MB_PER_VCPU = 1769
LAMBDA_MAX_VCPUS = 6
RUNTIME_RESERVE_MB = 256  # Python, onnxruntime, numpy and the request itself, measured at about 180 MB
MB = 2**20
#: How a pipeline spends its CPU threads (``quantfn.tasks.open_pipeline``); the first is the default.
PARALLELISM = ("auto", "data", "intra")
Env = dict[str, str]


class ConfigError(QuantfnError):
    """An environment variable has a value quantfn cannot use (a deployment error)."""

    code = "configuration_error"
    public_message = "The function is misconfigured. The function's log has the cause."


# ---- readers: the variable's raw text (never empty) -> the field's value; a ConfigError names the variable ----
def _read_int(name: str, raw: str, minimum: float) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got {value}")
    return value


def _read_float(name: str, raw: str, minimum: float) -> float:
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a finite number >= {minimum:g}, got {raw!r}")
    return value


def _read_bool(name: str, raw: str, _: float) -> bool:
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _read_list(name: str, raw: str, _: float) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


_READERS: dict[type, Callable[[str, str, float], Any]] = {
    int: _read_int,
    float: _read_float,
    bool: _read_bool,
    str: lambda _name, raw, _min: raw,
    Path: lambda _name, raw, _min: Path(raw),
    tuple: _read_list,
}


def _setting(
    env: str,
    default: Any,
    *,
    minimum: float = 0,
    unit: int = 1,
    choices: tuple[str, ...] = (),
    derived: Callable[[Env], Any] | None = None,
    reader: Callable[[Env], Any] | None = None,
) -> Any:
    """A field read from ``env``: ``default`` when unset (``derived(environ)`` instead, where given).

    ``unit``: the variable is in units of this many of the field's (``QUANTFN_CACHE_MAX_MB`` -> bytes);
    ``default`` is in the variable's units. ``choices``: the allowed values, the first the default.
    ``reader``: reads the whole environment, set or not (a value that more than one variable decides).
    """
    value = default * unit if unit != 1 else default
    metadata = {"env": env, "minimum": minimum, "unit": unit, "choices": choices, "derived": derived, "reader": reader}
    if isinstance(value, tuple):
        return field(default_factory=lambda: value, metadata=metadata)
    return field(default=value, metadata=metadata)


def _read_group(cls: type, env: Env) -> Any:
    """An instance of the settings group ``cls`` with every field read from ``env`` by its declaration."""
    values: dict[str, Any] = {}
    for spec in fields(cls):
        meta = spec.metadata
        if meta["reader"] is not None:
            values[spec.name] = meta["reader"](env)
            continue
        raw = env.get(meta["env"], "").strip()
        if not raw:
            if meta["derived"] is not None:
                values[spec.name] = meta["derived"](env)
            continue
        if meta["choices"]:
            raw = raw.lower()
            if raw not in meta["choices"]:
                raise ConfigError(f"{meta['env']} must be one of {', '.join(meta['choices'])}, got {raw!r}")
            values[spec.name] = raw
            continue
        default = spec.default if spec.default_factory is MISSING else spec.default_factory()
        value = _READERS[Path if isinstance(default, Path) else type(default)](meta["env"], raw, meta["minimum"])
        values[spec.name] = value * meta["unit"] if meta["unit"] != 1 else value
    return cls(**values)


# ---- derived defaults: what Lambda's environment says about the machine -------------------------------------
def available_vcpus(env: Env | None = None) -> int:
    """vCPUs this function can really use.

    Lambda reports more cores to the OS than a small function gets time on; its
    share grows with memory (about one vCPU per 1,769 MB, six at most). Outside
    Lambda this is the process's CPU affinity.
    """
    env = os.environ if env is None else env
    try:
        visible = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        visible = os.cpu_count() or 1
    memory = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip()
    if memory.isdigit():
        share = min(LAMBDA_MAX_VCPUS, max(1, math.ceil(int(memory) / LAMBDA_MB_PER_VCPU)))
        return max(1, min(visible, share))
    return max(1, visible)


def vcpu_share(env: Env | None = None) -> float:
    """The CPU time this function gets, in vCPUs (fractional below 1,769 MB); the cores visible outside Lambda."""
    env = os.environ if env is None else env
    memory = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip()
    if memory.isdigit():
        return min(float(LAMBDA_MAX_VCPUS), int(memory) / LAMBDA_MB_PER_VCPU)
    return float(available_vcpus(env))


def _model_memory_bytes(env: Env) -> int:
    """The function's memory less the runtime's own share; the field's default outside Lambda."""
    memory = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip()
    if memory.isdigit():
        return max(64, int(memory) - RUNTIME_RESERVE_MB) * MB
    return RuntimeSettings.model_memory_bytes


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")


def parse_models(env: Env) -> tuple[tuple[str, str], ...]:
    """``QUANTFN_MODELS`` (``name=reference,...``; a bare reference names itself by its model id), else the one
    ``QUANTFN_MODEL``, else the default. The references are checked by ``quantfn.models.reference``."""
    raw = env.get("QUANTFN_MODELS", "").strip()
    if not raw:
        single = env.get("QUANTFN_MODEL", "").strip() or DEFAULT_MODEL
        return ((_ref_id(single), single),)
    models: list[tuple[str, str]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, ref = item.partition("=")
        name, ref = (name.strip(), ref.strip()) if sep else (_ref_id(item), item)
        if not _MODEL_NAME.match(name):
            raise ConfigError(f"QUANTFN_MODELS: bad model name {name[:64]!r}; use letters, digits, '.', '_', '-'")
        if not ref:
            raise ConfigError(f"QUANTFN_MODELS: model {name!r} has no reference (name=layer:<id> or name=s3://...)")
        if any(name == seen for seen, _ in models):
            raise ConfigError(f"QUANTFN_MODELS names {name!r} twice")
        models.append((name, ref))
    if not models:
        raise ConfigError("QUANTFN_MODELS is set but lists no model")
    return tuple(models)


def _ref_id(ref: str) -> str:
    """The model id at the end of a reference: ``layer:<id>`` or ``s3://bucket/prefix/<id>/``."""
    return ref.rstrip("/").rsplit("/", 1)[-1].removeprefix("layer:")


def _server_port(env: Env) -> int:
    """SageMaker's ``SAGEMAKER_BIND_TO_PORT`` when QUANTFN_SERVER_PORT is unset, else the field's default."""
    raw = env.get("SAGEMAKER_BIND_TO_PORT", "").strip()
    return _read_int("SAGEMAKER_BIND_TO_PORT", raw, 1) if raw else ServerSettings.port


# ---- the seven groups ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeSettings:
    """The served models and how they run: where they come from, caches, threads, memory."""

    #: The served models, ``(name, reference)`` in order; the first is the default (``model``).
    models: tuple[tuple[str, str], ...] = _setting("QUANTFN_MODELS", ((_ref_id(DEFAULT_MODEL), DEFAULT_MODEL),),
                                                   reader=parse_models)  # fmt: skip
    model_aliases: tuple[str, ...] = _setting("QUANTFN_MODEL_ALIASES", ())
    models_root: Path = _setting("QUANTFN_MODELS_ROOT", Path("/opt/models"))
    cache_dir: Path = _setting("QUANTFN_CACHE_DIR", Path("/tmp/quantfn-models"))
    cache_max_bytes: int = _setting("QUANTFN_CACHE_MAX_MB", 400, minimum=1, unit=MB)
    #: Bytes the loaded sessions may take together; the least recently used is dropped first.
    model_memory_bytes: int = _setting("QUANTFN_MODEL_MEMORY_MB", 4096, minimum=16, unit=MB,
                                       derived=_model_memory_bytes)  # fmt: skip
    threads: int = _setting("QUANTFN_THREADS", 1, minimum=1, derived=available_vcpus)
    #: How ``threads`` are spent on CPU: "auto", "data" or "intra" (``quantfn.tasks.open_pipeline``).
    parallelism: str = _setting("QUANTFN_PARALLELISM", PARALLELISM[0], choices=PARALLELISM)
    batch_size: int = _setting("QUANTFN_BATCH_SIZE", 32, minimum=1)
    preload: bool = _setting("QUANTFN_PRELOAD", False)
    # Model fetches from S3 (models/store.py): per-read timeouts and the deadline a fetch gets without one.
    s3_connect_timeout_ms: int = _setting("QUANTFN_S3_CONNECT_TIMEOUT_MS", 2_000, minimum=1)
    s3_read_timeout_ms: int = _setting("QUANTFN_S3_READ_TIMEOUT_MS", 10_000, minimum=1)
    model_fetch_timeout_ms: int = _setting("QUANTFN_MODEL_FETCH_TIMEOUT_MS", 20_000, minimum=1)
    #: The CPU time this function gets, in vCPUs (read from Lambda's memory size, not a variable of ours).
    vcpu_share: float = _setting("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 1.0, reader=vcpu_share)

    @property
    def model(self) -> str:
        """The default model's reference: the first of ``models``."""
        return self.models[0][1]


@dataclass(frozen=True)
class LimitSettings:
    """What one request may ask of a function, and the cost model that predicts whether it runs in time.

    The cost model was measured with the int8 model by bench/route_cost.py (README, "The GPU route"): ms
    per token and per input on one vCPU and one thread (least-squares fit over 23/88/256-token texts, the
    higher of two runs), the second thread's speed-up (none measured on a shared 2-core host: conservative)
    and the cold load (verify + session + tokenizer from a local folder).
    """

    max_inputs: int = _setting("QUANTFN_MAX_INPUTS", 256, minimum=1)
    max_input_tokens: int = _setting("QUANTFN_MAX_INPUT_TOKENS", 8192, minimum=1)
    max_total_tokens: int = _setting("QUANTFN_MAX_TOTAL_TOKENS", 65536, minimum=1)
    max_body_bytes: int = _setting("QUANTFN_MAX_BODY_BYTES", 6 * MB, minimum=1)
    max_response_bytes: int = _setting("QUANTFN_MAX_RESPONSE_BYTES", 6 * MB, minimum=1)
    api_timeout_ms: int = _setting("QUANTFN_API_TIMEOUT_MS", 29_000, minimum=1)
    route_margin_ms: int = _setting("QUANTFN_ROUTE_MARGIN_MS", 3_000)
    cost_ms_per_token: float = _setting("QUANTFN_COST_MS_PER_TOKEN", 0.28)
    cost_ms_per_input: float = _setting("QUANTFN_COST_MS_PER_INPUT", 4.0)
    cost_parallel_efficiency: float = _setting("QUANTFN_COST_PARALLEL_EFFICIENCY", 0.0)
    cost_load_ms: int = _setting("QUANTFN_COST_LOAD_MS", 300)


@dataclass(frozen=True)
class EndpointSettings:
    """The GPU route (routing.py, endpoint.py): where oversized requests go, how calls retry, its own limits."""

    name: str = _setting("QUANTFN_ENDPOINT_NAME", "")
    url: str = _setting("QUANTFN_ENDPOINT_URL", "")
    timeout_ms: int = _setting("QUANTFN_ENDPOINT_TIMEOUT_MS", 25_000, minimum=1)
    connect_timeout_ms: int = _setting("QUANTFN_ENDPOINT_CONNECT_TIMEOUT_MS", 2_000, minimum=1)
    max_attempts: int = _setting("QUANTFN_ENDPOINT_MAX_ATTEMPTS", 3, minimum=1)
    backoff_base_ms: int = _setting("QUANTFN_ENDPOINT_BACKOFF_BASE_MS", 100)
    backoff_max_ms: int = _setting("QUANTFN_ENDPOINT_BACKOFF_MAX_MS", 2_000)
    breaker_failures: int = _setting("QUANTFN_ENDPOINT_BREAKER_FAILURES", 3, minimum=1)
    breaker_cooldown_ms: int = _setting("QUANTFN_ENDPOINT_BREAKER_COOLDOWN_MS", 30_000)
    max_inputs: int = _setting("QUANTFN_ENDPOINT_MAX_INPUTS", 2048, minimum=1)
    max_total_tokens: int = _setting("QUANTFN_ENDPOINT_MAX_TOTAL_TOKENS", 1_048_576, minimum=1)
    max_body_bytes: int = _setting("QUANTFN_ENDPOINT_MAX_BODY_BYTES", 6 * MB, minimum=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))  # one spelling of a URL: logs and names compare

    @property
    def configured(self) -> bool:
        return bool(self.name or self.url)


@dataclass(frozen=True)
class BatchSettings:
    """Batch jobs (functions/batch, quantfn.batch): chunks, time, lines, and how a large job fans out."""

    queue_url: str = _setting("QUANTFN_BATCH_QUEUE_URL", "")
    chunk_lines: int = _setting("QUANTFN_BATCH_CHUNK_LINES", 1000, minimum=1)
    safety_ms: int = _setting("QUANTFN_BATCH_SAFETY_MS", 20_000)
    max_line_bytes: int = _setting("QUANTFN_BATCH_MAX_LINE_BYTES", 1 * MB, minimum=64)
    shard_threshold_bytes: int = _setting("QUANTFN_BATCH_SHARD_THRESHOLD_BYTES", 8 * MB)
    shard_bytes: int = _setting("QUANTFN_BATCH_SHARD_BYTES", 4 * MB, minimum=1024)
    max_shards: int = _setting("QUANTFN_BATCH_MAX_SHARDS", 1000, minimum=1)
    max_receives: int = _setting("QUANTFN_BATCH_MAX_RECEIVES", 3, minimum=1)
    #: Where a message that can never succeed (a bad job message) goes at once, with the reason; empty: it is
    #: retried until the queue's redrive moves it (MaxReceiveCount receives, each after the visibility timeout).
    dead_letter_url: str = _setting("QUANTFN_BATCH_DEAD_LETTER_URL", "")


@dataclass(frozen=True)
class ServerSettings:
    """The GPU container (containers/gpu): model choice, HTTP server, micro-batching."""

    gpu_model: str = _setting("QUANTFN_GPU_MODEL", DEFAULT_GPU_MODEL)
    gpu_provider: str = _setting("QUANTFN_GPU_PROVIDER", "auto", choices=("auto", "cuda", "cpu"))
    host: str = _setting("QUANTFN_SERVER_HOST", "0.0.0.0")
    port: int = _setting("QUANTFN_SERVER_PORT", 8080, derived=_server_port)
    batch_wait_ms: float = _setting("QUANTFN_SERVER_BATCH_WAIT_MS", 5.0)
    batch_max_texts: int = _setting("QUANTFN_SERVER_BATCH_MAX_TEXTS", 256, minimum=1)
    queue_max: int = _setting("QUANTFN_SERVER_QUEUE_MAX", 64, minimum=1)
    backlog: int = _setting("QUANTFN_SERVER_BACKLOG", 512, minimum=1)
    max_inflight: int = _setting("QUANTFN_SERVER_MAX_INFLIGHT", 256, minimum=1)
    read_timeout_ms: int = _setting("QUANTFN_SERVER_READ_TIMEOUT_MS", 30_000, minimum=1)


@dataclass(frozen=True)
class AuthSettings:
    """API keys (quantfn.auth; the authorizer function and ``quantfn keys``)."""

    #: The SSM Parameter Store path of the key records (template: /quantfn/<stack name>/keys/).
    keys_prefix: str = _setting("QUANTFN_AUTH_KEYS_PREFIX", "/quantfn/quantfn/keys/")
    #: How long the authorizer keeps a key record it read (a revoked key may pass this long, plus API
    #: Gateway's own cache of the answer, KeyCacheSeconds).
    cache_seconds: float = _setting("QUANTFN_AUTH_CACHE_SECONDS", 60.0)


@dataclass(frozen=True)
class BuildSettings:
    """The model build (quantfn.modelbuild, never read by the functions)."""

    #: Where the build's evaluation data (PyPI wheels) and cached model outputs are kept.
    quality_cache: Path = _setting("QUANTFN_QUALITY_CACHE", Path("build") / "quality-cache")


_GROUPS = {
    "runtime": RuntimeSettings,
    "limits": LimitSettings,
    "endpoint": EndpointSettings,
    "batch": BatchSettings,
    "server": ServerSettings,
    "auth": AuthSettings,
    "build": BuildSettings,
}


@dataclass(frozen=True)
class Settings:
    """Every setting, by group; see the README's configuration table for each variable."""

    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    build: BuildSettings = field(default_factory=BuildSettings)

    @classmethod
    def from_env(cls, env: Env | None = None) -> Settings:
        """Every group read from ``env`` (default ``os.environ``); ConfigError names a variable it cannot use."""
        env = dict(os.environ if env is None else env)
        return cls(**{name: _read_group(group, env) for name, group in _GROUPS.items()})


def variables() -> dict[str, str]:
    """Every variable quantfn reads, with the field it sets (``group.field``): what the README must list."""
    return {
        spec.metadata["env"]: f"{name}.{spec.name}"
        for name, group in _GROUPS.items()
        for spec in fields(group)
        if spec.metadata["env"].startswith("QUANTFN_")
    } | {"QUANTFN_MODEL": "runtime.models"}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
