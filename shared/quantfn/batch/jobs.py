"""The job message: what a team puts on the queue, and the shard and checkpoint quantfn adds.

Body (JSON)::

    {"job_id": "corpus-2026-11-22", "model": "all-MiniLM-L6-v2", "task": "embed",   # or classify, rerank
     "input": {"s3_uri": "s3://bucket/in/corpus.jsonl"},       # or {"texts": [{"id": 1, "text": "..."}]}
     "output": "s3://bucket/out/",                              # results go under <output><job_id>/
     "shard_bytes": 4194304, "max_shards": 100,                 # optional: this job's shard size and cap
     "format": "int8",                                          # optional, embed: float32 | float16 | int8 | ubinary
     "shard": {...},                                            # set by the planner on shard messages only
     "checkpoint": {...}}                                       # set by quantfn on follow-up messages only

A message without ``shard`` is a job: the planner cuts it into shards. A message
with ``shard`` is one byte range of the input, pinned to the input's ETag (and
version id), processed chunk by chunk from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from quantfn.errors import BadRequest, echo

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TASKS = ("embed", "classify", "rerank")
_TASK_ALIASES = {"embedding": "embed"}  # the task name before classify and rerank
MIN_SHARD_BYTES = 1024
#: An embed job's output (quantfn.batch.vectors): float32 JSON Lines, or compact .npy vectors beside them.
FORMATS = ("float32", "float16", "int8", "ubinary")


class BadJob(BadRequest):
    """The message itself is unusable; it fails and, after its retries, lands in the dead-letter queue."""

    code = "bad_job"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, value: Any, field_name: str, prefix: bool = False) -> S3Location:
        if not isinstance(value, str) or not value.startswith("s3://"):
            raise BadJob(f"'{field_name}' must be an s3:// URI.", param=field_name)
        bucket, _, key = value[len("s3://") :].partition("/")
        if not bucket or (not key and not prefix):
            raise BadJob(f"'{field_name}' must name a bucket and a key: s3://bucket/key.", param=field_name)
        if prefix and key and not key.endswith("/"):
            key += "/"
        return cls(bucket, key)


@dataclass(frozen=True)
class Shard:
    """Bytes ``[start, end)`` of the input (record indexes for inline input), pinned to one object version."""

    index: int
    count: int
    start: int
    end: int
    etag: str = ""
    version_id: str = ""

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass(frozen=True)
class Checkpoint:
    """Where a shard resumes: chunk index, byte offset of its next line, totals of the chunks before it."""

    chunk: int = 0
    offset: int = 0
    line: int = 0
    results: int = 0
    errors: int = 0
    invocations: int = 0
    compute_ms: float = 0.0

    def advance(self, lines: int, results: int, errors: int, offset: int, compute_ms: float) -> Checkpoint:
        return replace(
            self,
            chunk=self.chunk + 1,
            offset=offset,
            line=self.line + lines,
            results=self.results + results,
            errors=self.errors + errors,
            compute_ms=self.compute_ms + compute_ms,
        )


@dataclass(frozen=True)
class JobMessage:
    job_id: str
    model: str
    output: S3Location
    task: str = "embed"
    input_uri: S3Location | None = None
    inline: tuple[Any, ...] = ()
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    shard: Shard | None = None
    shard_bytes: int | None = None
    max_shards: int | None = None
    format: str = "float32"

    @property
    def prefix(self) -> str:
        """Key prefix that holds everything this job writes."""
        return f"{self.output.key}{self.job_id}/"

    @property
    def input_name(self) -> str:
        """What identifies the input in job.json: its URI, or a digest of the inline records."""
        if self.input_uri:
            return self.input_uri.uri
        digest = hashlib.sha256(json.dumps(list(self.inline), sort_keys=True).encode("utf-8", "replace"))
        return f"inline:sha256:{digest.hexdigest()}"

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"job_id": self.job_id, "model": self.model, "task": self.task}
        body["input"] = {"s3_uri": self.input_uri.uri} if self.input_uri else {"texts": list(self.inline)}
        body["output"] = self.output.uri
        if self.format != "float32":
            body["format"] = self.format
        return body

    def for_shard(self, shard: Shard) -> str:
        """The body of the message that processes ``shard`` from its start."""
        return json.dumps(self._body() | {"shard": asdict(shard), "checkpoint": asdict(Checkpoint(offset=shard.start))})

    def follow_up(self, checkpoint: Checkpoint) -> str:
        """The body of the message that continues this shard from ``checkpoint``."""
        body = self._body() | {"checkpoint": asdict(checkpoint)}
        if self.shard is not None:
            body["shard"] = asdict(self.shard)
        return json.dumps(body)


_FIELDS = ("job_id", "model", "task", "input", "output", "format", "shard_bytes", "max_shards", "shard", "checkpoint")


def _integer(data: dict[str, Any], name: str, where: str, minimum: int = 0) -> int:
    """``data[name]``, an integer >= ``minimum`` (a bool is not one); BadJob naming ``where.name`` otherwise."""
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadJob(f"'{where}{name}' must be an integer >= {minimum}.", param=f"{where}{name}")
    return value


def _optional_int(data: dict[str, Any], name: str, minimum: int) -> int | None:
    return None if data.get(name) is None else _integer(data, name, "", minimum)


def _object(value: Any, name: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    """``value`` as an object holding every ``required`` key and no key outside ``required | optional``."""
    if not isinstance(value, dict):
        raise BadJob(f"'{name}' must be an object.", param=name)
    missing, unknown = sorted(required - set(value)), sorted(set(value) - required - optional)
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [f"unknown {', '.join(echo(key) for key in unknown[:5])}"] if unknown else []
    if problems:
        raise BadJob(f"'{name}' is malformed ({'; '.join(problems)}).", param=name)
    return value


def _shard(value: Any) -> Shard:
    data = _object(value, "shard", {"index", "count", "start", "end"}, {"etag", "version_id"})
    index, count = _integer(data, "index", "shard."), _integer(data, "count", "shard.", 1)
    start, end = _integer(data, "start", "shard."), _integer(data, "end", "shard.")
    if index >= count:
        raise BadJob(f"'shard.index' {index} is not below 'shard.count' {count}.", param="shard.index")
    if end < start:
        raise BadJob(f"'shard.end' {end} is before 'shard.start' {start}.", param="shard.end")
    pins = {}
    for name in ("etag", "version_id"):
        pin = data.get(name, "")
        if not isinstance(pin, str) or len(pin) > 1024:
            raise BadJob(f"'shard.{name}' must be a string of at most 1024 characters.", param=f"shard.{name}")
        pins[name] = pin
    return Shard(index, count, start, end, **pins)


def _checkpoint(value: Any, shard: Shard | None, inline: bool) -> Checkpoint:
    """A follow-up's checkpoint, each field checked and the whole checked against its shard's byte range."""
    if shard is None:
        raise BadJob("'checkpoint' comes only with a 'shard' (quantfn writes both).", param="checkpoint")
    counts = ("chunk", "offset", "line", "results", "errors", "invocations")
    data = _object(value, "checkpoint", set(counts), {"compute_ms"})
    chunk, offset, line, results, errors, invocations = (_integer(data, name, "checkpoint.") for name in counts)
    compute_ms = data.get("compute_ms", 0.0)
    if isinstance(compute_ms, bool) or not isinstance(compute_ms, (int, float)) or not 0 <= compute_ms < math.inf:
        raise BadJob("'checkpoint.compute_ms' must be a finite number >= 0.", param="checkpoint.compute_ms")
    if not shard.start <= offset <= shard.end:
        raise BadJob(
            f"'checkpoint.offset' {offset} is outside the shard's range [{shard.start}, {shard.end}].",
            param="checkpoint.offset",
        )
    if results + errors > line:
        raise BadJob("'checkpoint' counts more results and errors than lines.", param="checkpoint")
    # Nothing done, or something: a checkpoint's chunk, line and offset agree (an inline record is one line).
    if (inline and line != offset - shard.start) or not (chunk == 0) == (line == 0) == (offset == shard.start):
        raise BadJob("'checkpoint' chunk, line and offset disagree.", param="checkpoint")
    return Checkpoint(chunk, offset, line, results, errors, invocations, float(compute_ms))


def job_identity(body: str) -> tuple[str | None, int | None]:
    """The job id and shard index of a message body, as far as they can be read: for the record of a message
    that failed before (or while) it was parsed. Either is None where the body does not hold a valid one."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    job_id = data.get("job_id")
    shard = data.get("shard")
    index = shard.get("index") if isinstance(shard, dict) else None
    valid_index = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 2**31
    return (job_id if isinstance(job_id, str) and _JOB_ID.match(job_id) else None), (index if valid_index else None)


def parse_job_message(body: str, max_inline: int) -> JobMessage:
    """Validate a message body field by field; raises BadJob naming the field. Nothing is read or defaulted
    silently: an unknown field, a wrong type or a checkpoint outside its shard is refused."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError, RecursionError) as exc:
        raise BadJob("The message body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise BadJob("The message body must be a JSON object.")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        shown = ", ".join(echo(name) for name in unknown[:5])
        raise BadJob(f"Unknown field(s) {shown}; a job message has {', '.join(_FIELDS)}.", param=unknown[0][:64])
    job_id = data.get("job_id")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise BadJob("'job_id' must be 1-128 characters of letters, digits, '.', '_' or '-'.", param="job_id")
    model = data.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise BadJob("'model' is required (at most 256 characters).", param="model")
    task = data.get("task", "embed")
    task = _TASK_ALIASES.get(task, task) if isinstance(task, str) else task
    if task not in TASKS:
        raise BadJob(f"'task' must be one of {', '.join(TASKS)}.", param="task")
    output = S3Location.parse(data.get("output"), "output", prefix=True)
    source = data.get("input")
    if not isinstance(source, dict) or len(source) != 1 or not ({"s3_uri", "texts"} & set(source)):
        raise BadJob('\'input\' must be {"s3_uri": "s3://..."} or {"texts": [...]}.', param="input")
    input_uri, inline = None, ()
    if "s3_uri" in source:
        input_uri = S3Location.parse(source["s3_uri"], "input.s3_uri")
    else:
        texts = source["texts"]
        if not isinstance(texts, list) or not texts or len(texts) > max_inline:
            raise BadJob(f"'input.texts' must be a list of 1 to {max_inline} records.", param="input.texts")
        inline = tuple(texts)
    output_format = data.get("format", "float32")
    if output_format not in FORMATS:
        raise BadJob(f"'format' must be one of {', '.join(FORMATS)}.", param="format")
    shard = _shard(data["shard"]) if "shard" in data else None
    if shard is not None and inline and shard.end > len(inline):
        raise BadJob(f"'shard.end' {shard.end} is past the {len(inline)} inline records.", param="shard.end")
    if "checkpoint" in data:
        checkpoint = _checkpoint(data["checkpoint"], shard, inline=input_uri is None)
    else:
        checkpoint = Checkpoint(offset=shard.start if shard else 0)
    return JobMessage(
        job_id,
        model,
        output,
        task,
        input_uri,
        inline,
        checkpoint,
        shard,
        _optional_int(data, "shard_bytes", MIN_SHARD_BYTES),
        _optional_int(data, "max_shards", 1),
        output_format,
    )
