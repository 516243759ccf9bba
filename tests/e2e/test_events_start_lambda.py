"""Every events/ file, for its function, through one `sam local start-lambda` session.

The Lambda client is boto3's, pointed at SAM on 127.0.0.1; each function runs in a warm container
of the local base image with the runtime interface emulator, as `sam local invoke` runs it.
"""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.config import Config

from quantfn.batch.jobs import parse_job_message
from tests.conftest import EVENTS, load_event
from tests.e2e.replies import check_lambda_reply, function_for
from tests.e2e.sam_cli import functions_of
from tests.events_expected import API_EVENTS, AUTHORIZER_EVENTS
from tests.integration.test_batch_jobs import SQS_EVENTS, read_outputs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lambda_client(lambda_endpoint: str):
    return boto3.client(
        "lambda",
        endpoint_url=lambda_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(read_timeout=300, connect_timeout=10, retries={"total_max_attempts": 1}),
    )


def invoke(client, function: str, event: dict) -> dict:
    reply = client.invoke(FunctionName=function, Payload=json.dumps(event).encode())
    payload = json.loads(reply["Payload"].read())
    assert "FunctionError" not in reply, payload
    return payload


def test_every_function_has_events_and_every_event_a_function(sam_template) -> None:
    names = sorted(p.name for p in EVENTS.glob("*.json"))
    assert {function_for(name) for name in names} == set(functions_of(sam_template))
    assert set(API_EVENTS) | set(SQS_EVENTS) | set(AUTHORIZER_EVENTS) == set(names)


@pytest.mark.parametrize("name", sorted(AUTHORIZER_EVENTS))
def test_authorizer_event_gives_its_simple_answer(name: str, lambda_client) -> None:
    authorized, _, key_id = AUTHORIZER_EVENTS[name]
    answer = invoke(lambda_client, "AuthorizerFunction", load_event(name))
    assert answer == {"isAuthorized": authorized, "context": {"key_id": key_id}}


@pytest.mark.parametrize("name", sorted(API_EVENTS))
def test_api_event_gives_its_status_and_body(name: str, lambda_client) -> None:
    check_lambda_reply(name, invoke(lambda_client, "ApiFunction", load_event(name)))


def test_a_warm_container_loads_the_model_once(lambda_client) -> None:
    invoke(lambda_client, "ApiFunction", load_event("api-embeddings.json"))
    health = json.loads(invoke(lambda_client, "ApiFunction", load_event("api-health.json"))["body"])
    default = health["models"][0]
    assert health["status"] == "ok" and default["loaded"] is True and default["source"] == "layer"
    assert [m["name"] for m in health["models"]] == ["all-minilm-l6-v2", "intent-minilm-l6-v2"]


@pytest.mark.parametrize("name", sorted(SQS_EVENTS))
def test_sqs_event_reports_its_failures_and_writes_results_to_s3(name: str, lambda_client, aws_resources) -> None:
    event = load_event(name)
    reply = invoke(lambda_client, "BatchFunction", event)
    assert [item["itemIdentifier"] for item in reply["batchItemFailures"]] == SQS_EVENTS[name]
    s3 = boto3.client("s3", endpoint_url=aws_resources["endpoint"])
    for record in event["Records"]:
        if record["messageId"] not in SQS_EVENTS[name]:
            job = parse_job_message(record["body"], max_inline=256)
            results, errors, manifest = read_outputs(s3, job.output.bucket, job.prefix)
            assert manifest["status"] == "complete" and manifest["counts"]["errors"] == 0 and not errors
            assert results and all(len(r["embedding"]) == 384 for r in results)
