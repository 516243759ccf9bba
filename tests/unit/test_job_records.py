"""Poison lines (issue 14, item 1): each becomes an error record for its line, never a failed chunk."""

from __future__ import annotations

import json

import pytest

from quantfn.batch.records import Item, check_record, error_line
from quantfn.batch.sources import parse_line

DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"id": "a", "text": "\\ud800"}', "bad_text"),
        (b'{"id": "a", "text": "ok \\udc00 then"}', "bad_text"),
        (b'{"id": "\\ud800", "text": "fine"}', "bad_id"),
        (b'{"id": 18446744073709551616, "text": "2**64"}', "bad_id"),
        (b'{"id": -9223372036854775809, "text": "-2**63 - 1"}', "bad_id"),
        (DEEP, "bad_json"),
        (b'{"id": 1, "text": ' + DEEP + b"}", "bad_json"),
        (b'{"id": 1, "text": "\xff\xfe"}', "bad_encoding"),
        (b"\xc3", "bad_encoding"),
        (b"   ", "blank_line"),
        (b'{"id": 1, "text": "unterminated', "bad_json"),
        (b'{"id": true, "text": "a"}', "missing_id"),
        (b'{"id": 1, "text": 5}', "missing_text"),
        (b'{"id": 1, "text": " "}', "empty_text"),
        (b"[1, 2]", "bad_record"),
    ],
)
def test_given_a_poison_line_when_it_is_checked_then_it_is_an_error_record_that_can_be_written(
    raw: bytes, code: str
) -> None:
    record = parse_line(7, raw, 100, max_line_bytes=1 << 20)
    checked = check_record(record, "embed")
    assert isinstance(checked, tuple) and checked[0] == code
    written = error_line(record, *checked)
    written.encode("utf-8")  # always encodable: the record never fails the chunk it is written in
    assert json.loads(written)["line"] == 7 and json.loads(written)["error"]["code"] == code


def test_given_ids_at_the_64_bit_edges_then_they_pass() -> None:
    for raw in (b'{"id": 18446744073709551615, "text": "a"}', b'{"id": -9223372036854775808, "text": "a"}'):
        assert isinstance(check_record(parse_line(1, raw, 1, 1 << 20), "embed"), Item)


def test_given_a_rerank_line_then_query_and_documents_are_checked() -> None:
    good = parse_line(1, b'{"id": 1, "query": "q", "documents": ["a", "b"]}', 1, 1 << 20)
    item = check_record(good, "rerank")
    assert isinstance(item, Item) and item.documents == ("a", "b")
    bad = parse_line(2, b'{"id": 1, "query": "q", "documents": ["a", "\\ud800"]}', 1, 1 << 20)
    assert check_record(bad, "rerank") == ("bad_text", "'documents[1]' holds a lone surrogate (not valid Unicode)")
    assert check_record(parse_line(3, b'{"id": 1, "query": "q", "documents": []}', 1, 1 << 20), "rerank")[0] == (
        "missing_documents"
    )
