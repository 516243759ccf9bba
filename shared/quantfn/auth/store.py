"""Key records in SSM Parameter Store: one String parameter per key, ``<prefix><key id>``, holding JSON.

The value holds the key's SHA-256, never the key, so it needs no encryption (and the authorizer no KMS
grant). Several keys are active at once; rotation is ``create`` a new key, move the callers, ``revoke`` the
old: no deploy. The authorizer reads one parameter per check and keeps what it read for
``QUANTFN_AUTH_CACHE_SECONDS``; if SSM then fails, a record read earlier is used rather than refusing a
known caller, and with none a KeyStoreUnavailable is raised (the caller answers 5xx, never a cached "no").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

from quantfn.auth.keys import KeyRecord, digest, new_key
from quantfn.errors import BadRequest, QuantfnError, dependency_reason


class KeyStoreUnavailable(QuantfnError):
    """SSM could not be read and no record of the key was cached (503)."""

    status = 503
    code = "key_store_unavailable"
    public_message = "The API key store is unavailable right now; retry later."


def keys_prefix(stack: str) -> str:
    """The parameter path a stack's authorizer reads (template.yaml sets the same for its function)."""
    return f"/quantfn/{stack}/keys/"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class KeyStore:
    """Create, list, revoke and look up key records under ``prefix`` with a boto3 SSM client."""

    def __init__(
        self, ssm: Any, prefix: str, cache_seconds: float = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ssm = ssm
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    # -- the authorizer's read ------------------------------------------------------
    def get(self, key_id: str) -> KeyRecord | None:
        """The record of ``key_id`` (None if there is none), from the cache while it is fresh."""
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        try:
            record = self._read(key_id)
        except Exception as exc:
            if cached is not None and cached[1] is not None:
                return cached[1]  # SSM failed: a caller it knew keeps working while it is down
            raise KeyStoreUnavailable(f"SSM: {dependency_reason(exc)}") from exc
        self._cache[key_id] = (now, record)
        return record

    def _read(self, key_id: str) -> KeyRecord | None:
        try:
            value = self.ssm.get_parameter(Name=self.prefix + key_id)["Parameter"]["Value"]
        except self.ssm.exceptions.ParameterNotFound:
            return None
        return KeyRecord(**json.loads(value))

    # -- quantfn keys ---------------------------------------------------------------
    def create(self, name: str) -> tuple[str, KeyRecord]:
        """A new active key, its record written: ``(key, record)``. The key is shown once and kept nowhere."""
        if not name or len(name) > 128 or not name.isprintable():
            raise BadRequest("A key's name is 1 to 128 printable characters.", param="name")
        key_id, key = new_key()
        record = KeyRecord(key_id, name, digest(key), _now())
        self._write(record, overwrite=False)
        return key, record

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark ``key_id`` revoked (the record stays, for the audit trail); BadRequest if there is no such key."""
        record = self._read(key_id) if key_id.isalnum() else None
        if record is None:
            raise BadRequest(f"No key {key_id[:32]!r} under {self.prefix}.", param="key_id")
        if record.active:
            record = replace(record, revoked_at=_now())
            self._write(record, overwrite=True)
        return record

    def records(self) -> Iterator[KeyRecord]:
        """Every key record under the prefix, active and revoked."""
        for page in self.ssm.get_paginator("get_parameters_by_path").paginate(Path=self.prefix.rstrip("/")):
            for parameter in page["Parameters"]:
                yield KeyRecord(**json.loads(parameter["Value"]))

    def _write(self, record: KeyRecord, overwrite: bool) -> None:
        self.ssm.put_parameter(
            Name=self.prefix + record.key_id,
            Value=json.dumps(asdict(record)),
            Type="String",
            Overwrite=overwrite,
            Description=f"quantfn API key {record.key_id} (SHA-256 of the key, not the key)",
        )
