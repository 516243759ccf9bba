from __future__ import annotations

import hmac

import pytest

from quantfn.auth import keys
from quantfn.auth.keys import KeyRecord, check, digest, new_key


class Records(dict):
    """Key records by id: the one method check() reads."""

    def get(self, key_id: str) -> KeyRecord | None:  # type: ignore[override]
        return super().get(key_id)


KEY_ID, KEY = new_key()
RECORDS = Records({KEY_ID: KeyRecord(KEY_ID, "a", digest(KEY), "2026-12-07")})


def test_a_new_key_is_its_id_and_256_random_bits_and_only_its_digest_is_kept() -> None:
    key_id, key = new_key()
    assert key.startswith(f"qfn_{key_id}_") and len(key) == 4 + 12 + 1 + 43
    assert new_key()[1] != key and len(digest(key)) == 64 and key not in digest(key)


@pytest.mark.parametrize(
    "header",
    [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER   {KEY}  ", f"  Bearer {KEY}"],
    ids=["openai", "lower", "spaces", "leading"],
)
def test_the_bearer_scheme_is_read_as_http_says_in_any_case(header: str) -> None:
    assert check(header, RECORDS) == keys.Decision(True, "accepted", KEY_ID)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        (KEY, "malformed"),  # no scheme
        (f"Basic {KEY}", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer sk-proj-abc", "malformed"),  # someone's OpenAI key
        (f"Bearer {KEY}x", "malformed"),
        (f"Bearer {KEY}" + " " * 600, "malformed"),  # longer than any key: refused before any work
        (f"Bearer {KEY[:-1]}A" if not KEY.endswith("A") else f"Bearer {KEY[:-1]}B", "wrong_secret"),
        (f"Bearer qfn_000000000000_{KEY[-43:]}", "unknown"),
    ],
)
def test_anything_else_is_refused_with_a_reason(header: str | None, reason: str) -> None:
    decision = check(header, RECORDS)
    assert (decision.authorized, decision.reason) == (False, reason)


def test_a_revoked_key_is_refused() -> None:
    revoked = Records({KEY_ID: KeyRecord(KEY_ID, "a", digest(KEY), "2026-12-07", revoked_at="2026-12-08")})
    assert check(f"Bearer {KEY}", revoked) == keys.Decision(False, "revoked", KEY_ID)


def test_digests_are_compared_in_constant_time_known_id_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    check(f"Bearer {KEY}", RECORDS)
    check(f"Bearer qfn_000000000000_{KEY[-43:]}", RECORDS)
    assert len(compared) == 2 and all(len(a) == len(b) == 64 for a, b in compared)
