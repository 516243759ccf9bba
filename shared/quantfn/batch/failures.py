"""Why a job message failed, in words safe to log: an error code, a reason and whether a retry can help.

A reason never holds input text, an S3 key or a local path: it is our own message for a refused job
message (they name fields and limits, not values), or the AWS operation and the error code it
answered, or an exception's class. The cause with paths, where there is one, stays in the exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantfn.errors import QuantfnError, dependency_reason

#: What happened to the message: it comes back after its visibility timeout, went to the dead-letter queue (now, or
#: by the queue's redrive after this receive), or was acknowledged because its job cannot finish.
ACTIONS = ("retry", "dead_lettered", "job_failed")


@dataclass(frozen=True)
class Failure:
    code: str
    reason: str
    permanent: bool  # the same message can never succeed: dead-letter it now rather than after every retry
    action: str = "retry"

    def log_fields(self) -> dict[str, Any]:
        return {"error_code": self.code, "reason": self.reason, "action": self.action}


def failure_of(exc: BaseException) -> Failure:
    """The Failure an exception from processing a job message stands for."""
    if isinstance(exc, QuantfnError):
        if exc.status < 500:  # the message asks for something this deployment refuses: a retry gives the same
            return Failure(exc.code, exc.message[:500], permanent=True)
        return Failure(exc.code, f"{type(exc).__name__}: {exc.public_message}", permanent=False)
    reason = dependency_reason(exc)
    if reason != type(exc).__name__:  # the service answered: a retry may find it fixed (a bucket made, a grant)
        return Failure("dependency_failed", reason, permanent=False)
    if type(exc).__module__.startswith(("botocore", "urllib3")):  # no answer: connection, timeout, credentials
        return Failure("dependency_unreachable", reason, permanent=False)
    return Failure("internal_error", reason, permanent=False)
