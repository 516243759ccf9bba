"""Model references: ``layer:<model-id>`` or ``s3://bucket/prefix/<model-id>/``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantfn.config import ConfigError

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives. ``prefix`` is the S3 key prefix ending in ``<model-id>/``."""

    kind: str  # "layer" or "s3"
    model_id: str
    bucket: str = ""
    prefix: str = ""

    def __str__(self) -> str:
        if self.kind == "layer":
            return f"layer:{self.model_id}"
        return f"s3://{self.bucket}/{self.prefix}"


def parse_model_ref(text: str) -> ModelRef:
    """Parse a reference; raises ConfigError with the accepted forms on anything else."""
    text = text.strip()
    forms = "expected layer:<model-id> or s3://<bucket>/<prefix>/<model-id>/"
    if text.startswith("layer:"):
        model_id = text[len("layer:") :]
        if not _MODEL_ID.match(model_id):
            raise ConfigError(f"QUANTFN_MODEL {text!r}: bad model id; {forms}")
        return ModelRef("layer", model_id)
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://") :].partition("/")
        parts = [p for p in key.split("/") if p]
        if not _BUCKET.match(bucket) or not parts or not _MODEL_ID.match(parts[-1]):
            raise ConfigError(f"QUANTFN_MODEL {text!r}: {forms}")
        return ModelRef("s3", parts[-1], bucket=bucket, prefix="/".join(parts) + "/")
    raise ConfigError(f"QUANTFN_MODEL {text!r}: {forms}")
