"""What one input line must hold for its task, checked so that no line can fail its chunk.

embed and classify lines are ``{"id", "text"}``; rerank lines are
``{"id", "query", "documents": [...]}``. A value JSON can carry but the rest of
the pipeline cannot (a lone surrogate, ``"\\ud800"``, which no UTF-8 encoder
accepts; an integer id past 64 bits, which no JSON encoder of ours writes back)
is refused here, for that line only, with an error record naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from quantfn.batch.sources import Record

_ID_MIN, _ID_MAX = -(2**63), 2**64 - 1
MAX_ID_CHARS = 1024
MAX_DOCUMENTS = 1000


@dataclass(frozen=True)
class Item:
    """A line that passed its checks: ``text`` for embed/classify, ``query`` and ``documents`` for rerank."""

    record: Record
    id: str | int
    text: str = ""
    query: str = ""
    documents: tuple[str, ...] = ()


Problem = tuple[str, str]


def _encodable(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _text(value: Any, name: str) -> str | Problem:
    if not isinstance(value, str):
        return ("missing_text", f"'{name}' must be a string")
    if not _encodable(value):
        return ("bad_text", f"'{name}' holds a lone surrogate (not valid Unicode)")
    if not value.strip():
        return ("empty_text", f"'{name}' is empty")
    return value


def _id(value: Any) -> str | int | Problem:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return ("missing_id", "'id' must be a string or an integer")
    if isinstance(value, int) and not _ID_MIN <= value <= _ID_MAX:
        return ("bad_id", "'id' is an integer beyond 64 bits; send it as a string")
    if isinstance(value, str) and (len(value) > MAX_ID_CHARS or not _encodable(value)):
        return ("bad_id", f"'id' must be valid Unicode of at most {MAX_ID_CHARS} characters")
    return value


def check_record(record: Record, task: str) -> Item | Problem:
    """The record's Item, or (code, message) saying what is wrong with it."""
    if record.problem:
        return record.problem
    value = record.value
    if not isinstance(value, dict):
        fields = "'id', 'query' and 'documents'" if task == "rerank" else "'id' and 'text'"
        return ("bad_record", f"each line must be a JSON object with {fields}")
    if "id" not in value:
        return ("missing_id", "'id' must be a string or an integer")
    record_id = _id(value["id"])
    if isinstance(record_id, tuple):
        return record_id
    if task != "rerank":
        text = _text(value.get("text"), "text")
        return text if isinstance(text, tuple) else Item(record, record_id, text=text)
    query = _text(value.get("query"), "query")
    if isinstance(query, tuple):
        return query
    documents = value.get("documents")
    if not isinstance(documents, list) or not 1 <= len(documents) <= MAX_DOCUMENTS:
        return ("missing_documents", f"'documents' must be a list of 1 to {MAX_DOCUMENTS} strings")
    checked = [_text(d, f"documents[{i}]") for i, d in enumerate(documents)]
    for problem in checked:
        if isinstance(problem, tuple):
            return problem
    return Item(record, record_id, query=query, documents=tuple(checked))


def safe_id(record: Record) -> str | int | None:
    """The record's id if it can be written back, else None."""
    value = record.value.get("id") if isinstance(record.value, dict) else None
    checked = _id(value) if value is not None else None
    return None if isinstance(checked, tuple) else checked


def error_line(record: Record, code: str, message: str) -> str:
    """One error record: ``{"line", "id", "error": {"code", "message"}}`` (ASCII JSON, always encodable)."""
    return json.dumps({"line": record.line, "id": safe_id(record), "error": {"code": code, "message": message}})
