"""`sam local invoke FUNCTION -e events/FILE`, one process per event, exactly as a developer runs it."""

from __future__ import annotations

import boto3
import numpy as np
import pytest

from tests.conftest import DEFAULT_MODEL_ID, EVENTS
from tests.e2e.replies import check_lambda_reply, vectors
from tests.e2e.sam_cli import SamLocal
from tests.integration.test_batch_jobs import SQS_EVENTS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def layer_embeddings(sam: SamLocal) -> np.ndarray:
    reply, logs = sam.invoke("ApiFunction", EVENTS / "api-embeddings.json")
    assert "ColdStart" in logs  # a fresh execution environment, its EMF metrics in the function's log
    return vectors(check_lambda_reply("api-embeddings.json", reply))


def test_embeddings_event_answers_200_with_unit_vectors(layer_embeddings: np.ndarray) -> None:
    assert layer_embeddings.shape[1] == 384


def test_bad_request_event_answers_400_with_the_openai_error_body(sam: SamLocal) -> None:
    reply, _ = sam.invoke("ApiFunction", EVENTS / "api-bad-json.json")
    check_lambda_reply("api-bad-json.json", reply)


def test_batch_event_reports_the_poison_message_only(sam: SamLocal) -> None:
    reply, _ = sam.invoke("BatchFunction", EVENTS / "sqs-batch-bad-message.json")
    failed = [item["itemIdentifier"] for item in reply["batchItemFailures"]]
    assert failed == SQS_EVENTS["sqs-batch-bad-message.json"]


def test_a_model_from_s3_gives_the_same_vectors_as_the_layer(
    sam: SamLocal, built_dir, aws_resources, layer_embeddings: np.ndarray
) -> None:
    # Given the layer's model uploaded to S3 (moto on 127.0.0.1) and no model under the models root
    s3 = boto3.client("s3", endpoint_url=aws_resources["endpoint"])
    prefix = f"models/{DEFAULT_MODEL_ID}/"
    for path in (built_dir / "ModelLayer" / "models" / DEFAULT_MODEL_ID).iterdir():
        s3.upload_file(str(path), "quantfn-e2e-models", prefix + path.name)
    overrides = {
        "ApiFunction": {
            "QUANTFN_MODELS": f"all-minilm-l6-v2=s3://quantfn-e2e-models/{prefix}",
            "QUANTFN_MODELS_ROOT": "/nonexistent",
        }
    }
    # When the function serves a request
    reply, logs = sam.invoke("ApiFunction", EVENTS / "api-embeddings.json", env_vars=overrides)
    # Then the model came over HTTP from S3, was verified, and embeds exactly as the layer's copy
    from_s3 = vectors(check_lambda_reply("api-embeddings.json", reply))
    np.testing.assert_array_equal(from_s3, layer_embeddings)
    # (A "Failed to get next invocation" traceback may follow the reply: SAM stops the container then.)
    assert '"level":"ERROR"' not in logs
