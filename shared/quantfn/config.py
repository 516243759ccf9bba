"""Settings: every environment variable quantfn reads, parsed once into a frozen object.

Each variable is named here and documented in the README's configuration table.
``get_settings()`` caches the parsed object for the life of the execution
environment; tests call ``get_settings.cache_clear()`` after changing the env.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from quantfn.errors import QuantfnError

DEFAULT_MODEL = "layer:all-minilm-l6-v2"
LAMBDA_MB_PER_VCPU = 1769
LAMBDA_MAX_VCPUS = 6
DEFAULT_GPU_MODEL = "layer:all-minilm-l6-v2-fp16"
# The router's cost model, measured with the int8 model by bench/route_cost.py (README, "The GPU route"):
# ms per token and per input on one vCPU and one thread (least-squares fit over 23/88/256-token texts,
# the higher of two runs), the second thread's speed-up (none measured on a shared 2-core host: conservative)
# and the cold load (verify + session + tokenizer from a local folder).
COST_MS_PER_TOKEN = 0.28
COST_MS_PER_INPUT = 4.0
COST_PARALLEL_EFFICIENCY = 0.0
COST_LOAD_MS = 300


class ConfigError(QuantfnError):
    """An environment variable has a value quantfn cannot use (a deployment error)."""

    code = "configuration_error"
    public_message = "The function is misconfigured. The function's log has the cause."


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a finite number >= {minimum}, got {raw!r}")
    return value


def vcpu_share(env: dict[str, str] | None = None) -> float:
    """The CPU time this function gets, in vCPUs (fractional below 1,769 MB); the cores visible outside Lambda."""
    env = os.environ if env is None else env
    memory = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip()
    if memory.isdigit():
        return min(float(LAMBDA_MAX_VCPUS), int(memory) / LAMBDA_MB_PER_VCPU)
    return float(available_vcpus(env))


#: How a pipeline spends its CPU threads (``quantfn.tasks.open_pipeline``); the first is the default.
PARALLELISM = ("auto", "data", "intra")


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or choices[0]
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def available_vcpus(env: dict[str, str] | None = None) -> int:
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


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")
RUNTIME_RESERVE_MB = 256  # Python, onnxruntime, numpy and the request itself, measured at about 180 MB


def parse_models(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
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


def default_model_memory_mb(env: dict[str, str]) -> int:
    """The function's memory less the runtime's own share; 4 GB outside Lambda."""
    memory = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip()
    if memory.isdigit():
        return max(64, int(memory) - RUNTIME_RESERVE_MB)
    return 4096


@dataclass(frozen=True)
class Settings:
    """Typed settings; see the README for each variable's meaning."""

    #: The served models, ``(name, reference)`` in order; the first is the default (``model``).
    models: tuple[tuple[str, str], ...] = (("all-minilm-l6-v2", DEFAULT_MODEL),)
    #: Bytes the loaded sessions may take together; the least recently used is dropped first.
    model_memory_bytes: int = 4096 * 1024 * 1024
    models_root: Path = Path("/opt/models")
    cache_dir: Path = Path("/tmp/quantfn-models")
    cache_max_bytes: int = 400 * 1024 * 1024
    threads: int = 1
    #: How ``threads`` are spent on CPU: "auto", "data" or "intra" (``quantfn.tasks.open_pipeline``).
    parallelism: str = "auto"
    batch_size: int = 32
    max_inputs: int = 256
    max_input_tokens: int = 8192
    max_total_tokens: int = 65536
    max_body_bytes: int = 6 * 1024 * 1024
    model_aliases: tuple[str, ...] = field(default_factory=tuple)
    preload: bool = False
    # Model fetches from S3 (models/store.py): per-read timeouts and the deadline a fetch gets without one.
    s3_connect_timeout_ms: int = 2_000
    s3_read_timeout_ms: int = 10_000
    model_fetch_timeout_ms: int = 20_000
    # Batch jobs (functions/batch)
    batch_queue_url: str = ""
    batch_chunk_lines: int = 1000
    batch_safety_ms: int = 20_000
    batch_max_line_bytes: int = 1024 * 1024
    # Batch jobs that fan out (quantfn.batch.planner): when a job is cut into shards, how big, how many.
    batch_shard_threshold_bytes: int = 8 * 1024 * 1024
    batch_shard_bytes: int = 4 * 1024 * 1024
    batch_max_shards: int = 1000
    batch_max_receives: int = 3
    # The GPU route (routing.py, endpoint.py): where oversized requests go and how local time is predicted.
    endpoint_name: str = ""
    endpoint_url: str = ""
    endpoint_timeout_ms: int = 25_000
    endpoint_connect_timeout_ms: int = 2_000
    endpoint_max_attempts: int = 3
    endpoint_backoff_base_ms: int = 100
    endpoint_backoff_max_ms: int = 2_000
    endpoint_breaker_failures: int = 3
    endpoint_breaker_cooldown_ms: int = 30_000
    endpoint_max_inputs: int = 2048
    endpoint_max_total_tokens: int = 1_048_576
    endpoint_max_body_bytes: int = 6 * 1024 * 1024
    max_response_bytes: int = 6 * 1024 * 1024
    api_timeout_ms: int = 29_000
    route_margin_ms: int = 3_000
    cost_ms_per_token: float = COST_MS_PER_TOKEN
    cost_ms_per_input: float = COST_MS_PER_INPUT
    cost_parallel_efficiency: float = COST_PARALLEL_EFFICIENCY
    cost_load_ms: int = COST_LOAD_MS
    vcpu_share: float = 1.0
    # The GPU container (containers/gpu): model choice, HTTP server, micro-batching.
    gpu_model: str = DEFAULT_GPU_MODEL
    gpu_provider: str = "auto"
    server_host: str = "0.0.0.0"
    server_port: int = 8080
    server_batch_wait_ms: float = 5.0
    server_batch_max_texts: int = 256
    server_queue_max: int = 64
    server_backlog: int = 512
    server_max_inflight: int = 256
    server_read_timeout_ms: int = 30_000

    @property
    def model(self) -> str:
        """The default model's reference: the first of ``models``."""
        return self.models[0][1]

    @property
    def endpoint_configured(self) -> bool:
        return bool(self.endpoint_name or self.endpoint_url)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        aliases = tuple(a.strip() for a in env.get("QUANTFN_MODEL_ALIASES", "").split(",") if a.strip())
        threads = _int(env, "QUANTFN_THREADS", 0)
        models = parse_models(env)
        return cls(
            models=models,
            model_memory_bytes=_int(env, "QUANTFN_MODEL_MEMORY_MB", default_model_memory_mb(env), minimum=16) * 2**20,
            models_root=Path(env.get("QUANTFN_MODELS_ROOT", "").strip() or "/opt/models"),
            cache_dir=Path(env.get("QUANTFN_CACHE_DIR", "").strip() or "/tmp/quantfn-models"),
            cache_max_bytes=_int(env, "QUANTFN_CACHE_MAX_MB", 400, minimum=1) * 1024 * 1024,
            threads=threads or available_vcpus(env),
            parallelism=_choice(env, "QUANTFN_PARALLELISM", PARALLELISM),
            batch_size=_int(env, "QUANTFN_BATCH_SIZE", 32, minimum=1),
            max_inputs=_int(env, "QUANTFN_MAX_INPUTS", 256, minimum=1),
            max_input_tokens=_int(env, "QUANTFN_MAX_INPUT_TOKENS", 8192, minimum=1),
            max_total_tokens=_int(env, "QUANTFN_MAX_TOTAL_TOKENS", 65536, minimum=1),
            max_body_bytes=_int(env, "QUANTFN_MAX_BODY_BYTES", 6 * 1024 * 1024, minimum=1),
            model_aliases=aliases,
            preload=_bool(env, "QUANTFN_PRELOAD", False),
            s3_connect_timeout_ms=_int(env, "QUANTFN_S3_CONNECT_TIMEOUT_MS", 2_000, minimum=1),
            s3_read_timeout_ms=_int(env, "QUANTFN_S3_READ_TIMEOUT_MS", 10_000, minimum=1),
            model_fetch_timeout_ms=_int(env, "QUANTFN_MODEL_FETCH_TIMEOUT_MS", 20_000, minimum=1),
            batch_queue_url=env.get("QUANTFN_BATCH_QUEUE_URL", "").strip(),
            batch_chunk_lines=_int(env, "QUANTFN_BATCH_CHUNK_LINES", 1000, minimum=1),
            batch_safety_ms=_int(env, "QUANTFN_BATCH_SAFETY_MS", 20_000),
            batch_max_line_bytes=_int(env, "QUANTFN_BATCH_MAX_LINE_BYTES", 1024 * 1024, minimum=64),
            # Batch jobs that fan out
            batch_shard_threshold_bytes=_int(env, "QUANTFN_BATCH_SHARD_THRESHOLD_BYTES", 8 * 1024 * 1024),
            batch_shard_bytes=_int(env, "QUANTFN_BATCH_SHARD_BYTES", 4 * 1024 * 1024, minimum=1024),
            batch_max_shards=_int(env, "QUANTFN_BATCH_MAX_SHARDS", 1000, minimum=1),
            batch_max_receives=_int(env, "QUANTFN_BATCH_MAX_RECEIVES", 3, minimum=1),
            endpoint_name=env.get("QUANTFN_ENDPOINT_NAME", "").strip(),
            endpoint_url=env.get("QUANTFN_ENDPOINT_URL", "").strip().rstrip("/"),
            endpoint_timeout_ms=_int(env, "QUANTFN_ENDPOINT_TIMEOUT_MS", 25_000, minimum=1),
            endpoint_connect_timeout_ms=_int(env, "QUANTFN_ENDPOINT_CONNECT_TIMEOUT_MS", 2_000, minimum=1),
            endpoint_max_attempts=_int(env, "QUANTFN_ENDPOINT_MAX_ATTEMPTS", 3, minimum=1),
            endpoint_backoff_base_ms=_int(env, "QUANTFN_ENDPOINT_BACKOFF_BASE_MS", 100),
            endpoint_backoff_max_ms=_int(env, "QUANTFN_ENDPOINT_BACKOFF_MAX_MS", 2_000),
            endpoint_breaker_failures=_int(env, "QUANTFN_ENDPOINT_BREAKER_FAILURES", 3, minimum=1),
            endpoint_breaker_cooldown_ms=_int(env, "QUANTFN_ENDPOINT_BREAKER_COOLDOWN_MS", 30_000),
            endpoint_max_inputs=_int(env, "QUANTFN_ENDPOINT_MAX_INPUTS", 2048, minimum=1),
            endpoint_max_total_tokens=_int(env, "QUANTFN_ENDPOINT_MAX_TOTAL_TOKENS", 1_048_576, minimum=1),
            endpoint_max_body_bytes=_int(env, "QUANTFN_ENDPOINT_MAX_BODY_BYTES", 6 * 1024 * 1024, minimum=1),
            max_response_bytes=_int(env, "QUANTFN_MAX_RESPONSE_BYTES", 6 * 1024 * 1024, minimum=1),
            api_timeout_ms=_int(env, "QUANTFN_API_TIMEOUT_MS", 29_000, minimum=1),
            route_margin_ms=_int(env, "QUANTFN_ROUTE_MARGIN_MS", 3_000),
            cost_ms_per_token=_float(env, "QUANTFN_COST_MS_PER_TOKEN", COST_MS_PER_TOKEN),
            cost_ms_per_input=_float(env, "QUANTFN_COST_MS_PER_INPUT", COST_MS_PER_INPUT),
            cost_parallel_efficiency=_float(env, "QUANTFN_COST_PARALLEL_EFFICIENCY", COST_PARALLEL_EFFICIENCY),
            cost_load_ms=_int(env, "QUANTFN_COST_LOAD_MS", COST_LOAD_MS),
            vcpu_share=vcpu_share(env),
            gpu_model=env.get("QUANTFN_GPU_MODEL", "").strip() or DEFAULT_GPU_MODEL,
            gpu_provider=_choice(env, "QUANTFN_GPU_PROVIDER", ("auto", "cuda", "cpu")),
            server_host=env.get("QUANTFN_SERVER_HOST", "").strip() or "0.0.0.0",
            server_port=_int(env, "QUANTFN_SERVER_PORT", _int(env, "SAGEMAKER_BIND_TO_PORT", 8080)),
            server_batch_wait_ms=_float(env, "QUANTFN_SERVER_BATCH_WAIT_MS", 5.0),
            server_batch_max_texts=_int(env, "QUANTFN_SERVER_BATCH_MAX_TEXTS", 256, minimum=1),
            server_queue_max=_int(env, "QUANTFN_SERVER_QUEUE_MAX", 64, minimum=1),
            server_backlog=_int(env, "QUANTFN_SERVER_BACKLOG", 512, minimum=1),
            server_max_inflight=_int(env, "QUANTFN_SERVER_MAX_INFLIGHT", 256, minimum=1),
            server_read_timeout_ms=_int(env, "QUANTFN_SERVER_READ_TIMEOUT_MS", 30_000, minimum=1),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
