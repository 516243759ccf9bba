"""Client of the GPU endpoint: a SageMaker real-time endpoint or a plain HTTP(S) URL.

Both speak the container's contract (containers/gpu): ``POST /invocations`` with
the OpenAI embeddings JSON. Every call has a deadline (the caller's remaining
time), which bounds the whole call, a reply that trickles in included; attempts
are retried with full-jitter exponential backoff on throttling, 5xx and connection
failures, never on other 4xx, and a 429's or 503's ``Retry-After`` is honoured when
it fits the deadline; a circuit breaker stops calling an endpoint that keeps
failing (a 4xx is the request's fault, not the endpoint's: it never opens it).
The task that makes a call checks its reply (count, dimensions, finite numbers,
``quantfn.tasks``) before anyone sees it: the caller gets the whole answer or an error.

Errors: ``EndpointUnavailable`` (503: not configured, not found, circuit open),
``UpstreamFailed`` (502: failed, timed out, invalid reply), ``TooLarge`` (413:
the endpoint's own limit refused the request).
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import math
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from quantfn.config import Settings
from quantfn.errors import EndpointUnavailable, TooLarge, UpstreamFailed
from quantfn.tracing import subsegment

_MIN_ATTEMPT_S = 0.05  # no attempt is started with less time than this left
_RETRYABLE_SAGEMAKER = {
    "ThrottlingException",
    "ModelNotReadyException",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalDependencyException",
}


class CallFailed(Exception):
    """One attempt failed. ``retryable``: worth another attempt; ``status``: HTTP status if one came back."""

    def __init__(
        self,
        detail: str,
        *,
        retryable: bool,
        status: int | None = None,
        body: bytes = b"",
        missing: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.status = status
        self.body = body
        self.missing = missing  # the endpoint does not exist (a deployment error, not a transient one)
        self.retry_after_s = retry_after_s  # the endpoint's Retry-After, when it sent one

    @property
    def endpoint_fault(self) -> bool:
        """Does this count against the endpoint's health? Not a 4xx: that is the request's fault."""
        return self.missing or self.status is None or self.status >= 500


@dataclass(frozen=True)
class EndpointReply:
    output: np.ndarray  # embeddings, scores or label scores, as the call asked
    model: str
    attempts: int
    elapsed_ms: float


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failed calls -> half-open after ``cooldown_s`` (one probe)."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        """May a call go out now? In half-open, only one probe at a time."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return True
            if state == "half-open" and not self._probing:
                self._probing = True
                return True
            return False

    def retry_in_s(self) -> float:
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        with self._lock:
            self._consecutive, self._opened_at, self._probing = 0, None, False

    def record_answer(self) -> None:
        """The endpoint answered but refused the request (4xx): neither a success nor a failure; a probe ends."""
        with self._lock:
            self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._probing or self._consecutive >= self.failures:
                self._opened_at = self._clock()  # a failed probe opens it again for a full cool-down
            self._probing = False


class HttpTransport:
    """``POST <url>/invocations`` with http.client: a connect timeout, and the attempt's timeout on the whole call.

    A socket timeout applies per read, so a reply trickling in a byte at a time would never hit it:
    a timer shuts the socket down when the attempt's time is up, whatever the call is doing.
    """

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointUnavailable(f"QUANTFN_ENDPOINT_URL must be an http(s) URL, got {url!r}", code="bad_endpoint")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        path = parts.path.rstrip("/")
        self.path = path if path.endswith("/invocations") else f"{path}/invocations"
        self.connect_timeout_s = connect_timeout_s
        self.name = f"{self.scheme}://{self.host}:{self.port or ''}{self.path}"

    def post(self, body: bytes, timeout_s: float) -> bytes:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        connection = cls(self.host, self.port, timeout=min(self.connect_timeout_s, timeout_s))
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            if connection.sock is not None:
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)  # unblocks a read in progress

        timer = threading.Timer(timeout_s, expire)
        timer.daemon = True
        started = time.monotonic()
        timer.start()
        try:
            connection.connect()
            connection.sock.settimeout(max(_MIN_ATTEMPT_S, timeout_s - (time.monotonic() - started)))
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            connection.request("POST", self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            if expired.is_set():
                raise TimeoutError
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set() or isinstance(exc, TimeoutError):
                raise CallFailed(f"no answer within {timeout_s:.2f} s (whole reply)", retryable=True) from exc
            raise CallFailed(f"connection failed: {exc.__class__.__name__}", retryable=True) from exc
        finally:
            timer.cancel()
            connection.close()
        if response.status == 200:
            return data
        retryable = response.status == 429 or response.status >= 500
        retry_after = _retry_after_s(response.getheader("Retry-After")) if retryable else None
        raise CallFailed(
            f"HTTP {response.status}", retryable=retryable, status=response.status, body=data, retry_after_s=retry_after
        )


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class SageMakerTransport:
    """``sagemaker-runtime`` InvokeEndpoint; botocore's own retries are off (this module retries)."""

    def __init__(self, endpoint_name: str, connect_timeout_s: float) -> None:
        self.endpoint_name = endpoint_name
        self.connect_timeout_s = connect_timeout_s
        self.name = f"sagemaker:{endpoint_name}"
        self._clients: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _client(self, timeout_s: float) -> Any:
        # botocore fixes the read timeout per client: keep one client per whole second of timeout.
        seconds = max(1, math.ceil(timeout_s))
        with self._lock:
            if seconds not in self._clients:
                import boto3  # deferred: only a routed request pays for it
                from botocore.config import Config

                config = Config(
                    connect_timeout=self.connect_timeout_s,
                    read_timeout=seconds,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                )
                self._clients[seconds] = boto3.client("sagemaker-runtime", config=config)
            return self._clients[seconds]

    def post(self, body: bytes, timeout_s: float) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = self._client(timeout_s).invoke_endpoint(
                EndpointName=self.endpoint_name, ContentType="application/json", Accept="application/json", Body=body
            )
            return reply["Body"].read()
        except ClientError as exc:
            raise _sagemaker_failure(exc) from exc
        except BotoCoreError as exc:
            raise CallFailed(f"SageMaker runtime unreachable: {exc.__class__.__name__}", retryable=True) from exc


def _sagemaker_failure(exc: Any) -> CallFailed:
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code == "ModelError":  # the container answered with an error: judge by its own status
        original = int(exc.response.get("OriginalStatusCode", 0) or 0)
        body = str(exc.response.get("OriginalMessage", "")).encode()
        return CallFailed(
            f"container answered HTTP {original}",
            retryable=original == 429 or original >= 500,
            status=original or None,
            body=body,
        )
    if code == "ValidationError" and ("not found" in message.lower() or "could not find" in message.lower()):
        return CallFailed(f"{code}: endpoint not found", retryable=False, status=status, missing=True)
    retryable = code in _RETRYABLE_SAGEMAKER or status == 429 or status >= 500
    return CallFailed(f"{code or 'error'} (HTTP {status})", retryable=retryable, status=status)


class EndpointClient:
    """Calls the GPU endpoint within a deadline, with retries and a circuit breaker (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        transport: Any | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.transport = transport or make_transport(settings)
        self.breaker = CircuitBreaker(
            settings.endpoint.breaker_failures, settings.endpoint.breaker_cooldown_ms / 1000, clock=clock
        )
        self._sleep, self._jitter, self._clock = sleep, jitter, clock

    def call(self, body: dict[str, Any], deadline_s: float, parse: Callable[[bytes], np.ndarray]) -> EndpointReply:
        """POST ``body`` (a task's request in the container's contract: ``task`` absent means embeddings) and
        ``parse`` the reply (the task checks it: count, shape, finite numbers); ``deadline_s`` is on
        ``time.monotonic`` and bounds the whole call, retries included."""
        if not self.breaker.allow():
            raise EndpointUnavailable(
                f"GPU endpoint {self.transport.name}: circuit open after {self.breaker.failures} consecutive "
                f"failures; next try in {self.breaker.retry_in_s():.1f} s",
                code="endpoint_circuit_open",
            )
        started = self._clock()
        try:
            with subsegment("endpoint_call", endpoint=self.transport.name, task=str(body.get("task", "embed"))):
                data, attempts = self._post_with_retries(json.dumps(body).encode(), deadline_s)
            output = parse(data)
        except CallFailed as failure:
            raise self._failed(failure) from failure
        except UpstreamFailed:
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return EndpointReply(output, str(body["model"]), attempts, (self._clock() - started) * 1000)

    def _post_with_retries(self, body: bytes, deadline_s: float) -> tuple[bytes, int]:
        settings = self.settings
        attempt = 0
        while True:
            attempt += 1
            left = deadline_s - self._clock()
            if left < _MIN_ATTEMPT_S:
                raise CallFailed(f"no time left for attempt {attempt}", retryable=False)
            try:
                return self.transport.post(body, min(settings.endpoint.timeout_ms / 1000, left)), attempt
            except CallFailed as failure:
                failure.detail = f"{failure.detail} (attempt {attempt})"
                if not failure.retryable or attempt >= settings.endpoint.max_attempts:
                    raise
                cap = min(settings.endpoint.backoff_max_ms, settings.endpoint.backoff_base_ms * 2 ** (attempt - 1))
                pause = self._jitter() * cap / 1000  # full jitter: uniform in [0, cap)
                if failure.retry_after_s is not None:  # the endpoint said when: no sooner
                    pause = max(pause, failure.retry_after_s)
                if self._clock() + pause + _MIN_ATTEMPT_S > deadline_s:
                    if failure.retry_after_s is not None:
                        failure.detail += f"; Retry-After {failure.retry_after_s:.1f} s is past the deadline"
                    raise
                self._sleep(pause)

    def _failed(self, failure: CallFailed) -> Exception:
        where = self.transport.name
        if not failure.endpoint_fault:
            self.breaker.record_answer()
        else:
            self.breaker.record_failure()
        if failure.status == 413:
            message = _error_message(failure.body) or "the request is over its limits"
            return TooLarge(f"The GPU endpoint refused the request: {message}", param="input")
        if failure.missing:
            return EndpointUnavailable(
                f"GPU endpoint {where} does not exist: {failure.detail}", code="endpoint_missing"
            )
        return UpstreamFailed(f"GPU endpoint {where} failed: {failure.detail}")


def make_transport(settings: Settings) -> HttpTransport | SageMakerTransport:
    """The transport the settings name: a URL wins over a SageMaker endpoint name."""
    connect_s = settings.endpoint.connect_timeout_ms / 1000
    if settings.endpoint.url:
        return HttpTransport(settings.endpoint.url, connect_s)
    if settings.endpoint.name:
        return SageMakerTransport(settings.endpoint.name, connect_s)
    raise EndpointUnavailable(
        "no GPU endpoint is configured (QUANTFN_ENDPOINT_NAME or QUANTFN_ENDPOINT_URL)", code="endpoint_not_configured"
    )


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return ""
