"""Settings: every environment variable quantfn reads, parsed once into a frozen object.

Each variable is named here and documented in the README's configuration table.
``get_settings()`` caches the parsed object for the life of the execution
environment; tests call ``get_settings.cache_clear()`` after changing the env.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from quantfn.errors import QuantfnError

DEFAULT_MODEL = "layer:all-minilm-l6-v2"
LAMBDA_MB_PER_VCPU = 1769
LAMBDA_MAX_VCPUS = 6


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


@dataclass(frozen=True)
class Settings:
    """Typed settings; see the README for each variable's meaning."""

    model: str = DEFAULT_MODEL
    models_root: Path = Path("/opt/models")
    cache_dir: Path = Path("/tmp/quantfn-models")
    cache_max_bytes: int = 400 * 1024 * 1024
    threads: int = 1
    batch_size: int = 32
    max_inputs: int = 256
    max_input_tokens: int = 8192
    max_total_tokens: int = 65536
    max_body_bytes: int = 6 * 1024 * 1024
    model_aliases: tuple[str, ...] = field(default_factory=tuple)
    preload: bool = False
    # Batch jobs (functions/batch)
    batch_queue_url: str = ""
    batch_chunk_lines: int = 1000
    batch_safety_ms: int = 20_000
    batch_max_line_bytes: int = 1024 * 1024

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        aliases = tuple(a.strip() for a in env.get("QUANTFN_MODEL_ALIASES", "").split(",") if a.strip())
        threads = _int(env, "QUANTFN_THREADS", 0)
        return cls(
            model=env.get("QUANTFN_MODEL", "").strip() or DEFAULT_MODEL,
            models_root=Path(env.get("QUANTFN_MODELS_ROOT", "").strip() or "/opt/models"),
            cache_dir=Path(env.get("QUANTFN_CACHE_DIR", "").strip() or "/tmp/quantfn-models"),
            cache_max_bytes=_int(env, "QUANTFN_CACHE_MAX_MB", 400, minimum=1) * 1024 * 1024,
            threads=threads or available_vcpus(env),
            batch_size=_int(env, "QUANTFN_BATCH_SIZE", 32, minimum=1),
            max_inputs=_int(env, "QUANTFN_MAX_INPUTS", 256, minimum=1),
            max_input_tokens=_int(env, "QUANTFN_MAX_INPUT_TOKENS", 8192, minimum=1),
            max_total_tokens=_int(env, "QUANTFN_MAX_TOTAL_TOKENS", 65536, minimum=1),
            max_body_bytes=_int(env, "QUANTFN_MAX_BODY_BYTES", 6 * 1024 * 1024, minimum=1),
            model_aliases=aliases,
            preload=_bool(env, "QUANTFN_PRELOAD", False),
            batch_queue_url=env.get("QUANTFN_BATCH_QUEUE_URL", "").strip(),
            batch_chunk_lines=_int(env, "QUANTFN_BATCH_CHUNK_LINES", 1000, minimum=1),
            batch_safety_ms=_int(env, "QUANTFN_BATCH_SAFETY_MS", 20_000),
            batch_max_line_bytes=_int(env, "QUANTFN_BATCH_MAX_LINE_BYTES", 1024 * 1024, minimum=64),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
