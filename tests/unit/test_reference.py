from __future__ import annotations

import pytest

from quantfn.config import ConfigError
from quantfn.models.reference import parse_model_ref


def test_layer_reference() -> None:
    ref = parse_model_ref("layer:all-minilm-l6-v2")
    assert (ref.kind, ref.model_id, str(ref)) == ("layer", "all-minilm-l6-v2", "layer:all-minilm-l6-v2")


@pytest.mark.parametrize(
    "text", ["s3://my-bucket/models/m1/", "s3://my-bucket/models/m1", "s3://my-bucket//models//m1/"]
)
def test_s3_reference_takes_the_last_segment_as_model_id(text: str) -> None:
    ref = parse_model_ref(text)
    assert (ref.kind, ref.bucket, ref.prefix, ref.model_id) == ("s3", "my-bucket", "models/m1/", "m1")


@pytest.mark.parametrize(
    "text", ["", "m1", "layer:", "layer:../etc", "s3://", "s3://Bad_Bucket/m1/", "s3://bucket/", "http://x/m1"]
)
def test_bad_references_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ConfigError, match="layer:<model-id>"):
        parse_model_ref(text)
