"""What an API key is and how one is checked. A key is never stored, logged or compared in plain text.

A key reads ``qfn_<key id>_<secret>``: the id (12 characters, not secret) names its record, so one record is
read per check however many keys exist; the secret is 256 random bits. The record holds the key's SHA-256
(a fast hash is enough for 256 random bits: there is nothing to guess), compared with
``hmac.compare_digest``, so the time taken does not depend on how much of a wrong key matches.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

PREFIX = "qfn"
_KEY = re.compile(rf"^{PREFIX}_([a-z0-9]{{12}})_([A-Za-z0-9_-]{{43}})$")
_MAX_HEADER = 512  # far longer than any key: a longer header is refused before any work
_NO_RECORD = hashlib.sha256(b"no such key").hexdigest()  # compared against when there is no record


@dataclass(frozen=True)
class KeyRecord:
    """What is kept about a key: its id, a name for people, the SHA-256 of the key, and whether it is usable."""

    key_id: str
    name: str
    sha256: str
    created_at: str
    revoked_at: str = ""

    @property
    def active(self) -> bool:
        return not self.revoked_at


@dataclass(frozen=True)
class Decision:
    """``reason``: accepted, missing (no Authorization header), malformed (not ``Bearer qfn_...``), unknown
    (no record for the id), wrong_secret, or revoked. ``key_id`` is set once the header named one."""

    authorized: bool
    reason: str
    key_id: str = ""


class KeyLookup(Protocol):
    def get(self, key_id: str) -> KeyRecord | None: ...


def new_key() -> tuple[str, str]:
    """A fresh key and its id: ``(key_id, key)``."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    key_id = "".join(secrets.choice(alphabet) for _ in range(12))
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_key(header: str | None) -> str | None:
    """The key in an ``Authorization`` header value (``Bearer <key>``, the scheme in any case), else None."""
    if not header or len(header) > _MAX_HEADER:
        return None
    scheme, _, key = header.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def check(header: str | None, keys: KeyLookup) -> Decision:
    """Whether the ``Authorization`` header holds an active key. Raises what ``keys.get`` raises (the store is
    unreachable): a caller must not turn that into a refusal that gets cached."""
    if not header:
        return Decision(False, "missing")
    key = bearer_key(header)
    match = _KEY.match(key) if key else None
    if match is None:
        return Decision(False, "malformed")
    key_id = match.group(1)
    record = keys.get(key_id)
    equal = hmac.compare_digest(digest(key), record.sha256 if record else _NO_RECORD)
    if record is None:
        return Decision(False, "unknown", key_id)
    if not equal:
        return Decision(False, "wrong_secret", key_id)
    if not record.active:
        return Decision(False, "revoked", key_id)
    return Decision(True, "accepted", key_id)
