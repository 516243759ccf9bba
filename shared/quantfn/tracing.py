"""X-Ray subsegments around the slow steps, through Powertools Tracer; free when tracing is off.

``subsegment("model_fetch")`` (also session_create, tokenize, inference, endpoint_call)
records a subsegment when tracing is on: in Lambda with ``Tracing: Active``, unless
``POWERTOOLS_TRACE_DISABLED`` is true or the function runs under ``sam local``
(Powertools' own rule). Off, which every local run and test is by default, it
does nothing and never imports aws_xray_sdk: importing it and patching botocore
costs about 0.7 s of cold start here (README, Tracing). ``capture_lambda_handler``
wraps a handler the same way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

Handler = TypeVar("Handler", bound=Callable[..., Any])

_FALSE = {"", "0", "false", "no", "off"}
_tracer: Any = None
_lock = threading.Lock()
_enabled: bool | None = None  # tracing_enabled() as read once: a function's environment does not change


def tracing_enabled() -> bool:
    """Powertools' rule, read without importing the X-Ray SDK: in Lambda, not under sam local, not disabled."""
    if os.environ.get("POWERTOOLS_TRACE_DISABLED", "").strip().lower() not in _FALSE:
        return False
    if os.environ.get("AWS_SAM_LOCAL") or os.environ.get("AWS_CHALICE_CLI_MODE"):
        return False
    return bool(os.environ.get("LAMBDA_TASK_ROOT"))


def get_tracer() -> Any:
    """The process-wide Powertools Tracer (created, and aws_xray_sdk imported, on first use)."""
    global _tracer
    if _tracer is None:
        with _lock:
            if _tracer is None:
                from aws_lambda_powertools import Tracer

                _tracer = Tracer(service=os.environ.get("POWERTOOLS_SERVICE_NAME") or "quantfn")
    return _tracer


def set_tracer(tracer: Any) -> None:
    """Use ``tracer`` (tests: a Tracer with a recording provider, or in its disabled mode); None resets.

    Resetting also forgets whether tracing is on: the next subsegment reads the environment again.
    """
    global _tracer, _enabled
    _tracer, _enabled = tracer, None


def _on() -> bool:
    # Every request opens several subsegments: the environment is read on the first, not on each.
    global _enabled
    if _tracer is not None:
        return True
    if _enabled is None:
        _enabled = tracing_enabled()
    return _enabled


def subsegment(name: str, **annotations: str | int | float | bool) -> AbstractContextManager[None]:
    """A subsegment named ``## name`` with ``annotations`` when tracing is on; nothing otherwise."""
    return _traced(name, annotations) if _on() else _OFF


_OFF = nullcontext()  # stateless: one serves every untraced step


@contextmanager
def _traced(name: str, annotations: dict[str, str | int | float | bool]) -> Iterator[None]:
    with get_tracer().provider.in_subsegment(name=f"## {name}") as segment:
        for key, value in annotations.items():
            segment.put_annotation(key=key, value=value)
        yield


def capture_lambda_handler(handler: Handler) -> Handler:
    """The handler under ``Tracer.capture_lambda_handler`` when tracing is on at import; unchanged otherwise."""
    if not _on():
        return handler
    return get_tracer().capture_lambda_handler(handler, capture_response=False)
