"""The job message: what a team puts on the queue, and the checkpoint a follow-up carries.

Body (JSON)::

    {"job_id": "corpus-2026-11-22", "model": "all-MiniLM-L6-v2", "task": "embedding",
     "input": {"s3_uri": "s3://bucket/in/corpus.jsonl"}        # or {"texts": [{"id": 1, "text": "..."}]}
     "output": "s3://bucket/out/",                              # results go under <output><job_id>/
     "checkpoint": {...}}                                        # set by quantfn on follow-up messages only
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from quantfn.errors import BadRequest

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TASKS = ("embedding",)


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
class Checkpoint:
    """Where a job resumes: chunk index, byte offset of its first line, totals of the chunks before it."""

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
    task: str = "embedding"
    input_uri: S3Location | None = None
    inline: tuple[dict[str, Any], ...] = ()
    checkpoint: Checkpoint = field(default_factory=Checkpoint)

    @property
    def prefix(self) -> str:
        """Key prefix that holds everything this job writes."""
        return f"{self.output.key}{self.job_id}/"

    def follow_up(self, checkpoint: Checkpoint) -> str:
        """The body of the message that continues this job from ``checkpoint``."""
        body: dict[str, Any] = {"job_id": self.job_id, "model": self.model, "task": self.task}
        body["input"] = {"s3_uri": self.input_uri.uri} if self.input_uri else {"texts": list(self.inline)}
        body["output"] = self.output.uri
        body["checkpoint"] = asdict(checkpoint)
        return json.dumps(body)


def parse_job_message(body: str, max_inline: int) -> JobMessage:
    """Validate a message body; raises BadJob naming the field."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise BadJob("The message body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise BadJob("The message body must be a JSON object.")
    job_id = data.get("job_id")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise BadJob("'job_id' must be 1-128 characters of letters, digits, '.', '_' or '-'.", param="job_id")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadJob("'model' is required.", param="model")
    task = data.get("task", "embedding")
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
    checkpoint = Checkpoint()
    if "checkpoint" in data:
        try:
            checkpoint = Checkpoint(**data["checkpoint"])
        except TypeError as exc:
            raise BadJob("'checkpoint' is malformed.", param="checkpoint") from exc
    return JobMessage(job_id, model, output, task, input_uri, inline, checkpoint)
