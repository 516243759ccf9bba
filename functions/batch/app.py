"""Batch function: SQS job and shard messages -> results in S3, reporting partial batch failures."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from quantfn.batch.runner import Delivery, JobRunner
from quantfn.emf import function_metrics
from quantfn.registry import get_registry
from quantfn.serialize import log_json
from quantfn.tracing import capture_lambda_handler
from quantfn.warmup import prepare_init

logger = Logger(service="quantfn-batch", json_serializer=log_json)
metrics = function_metrics("quantfn-batch")
# A batch whose every record failed is still a partial-batch reply (batchItemFailures), not an exception:
# with one message per invocation, raising would hide which message failed and skip the metrics.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
prepare_init()  # loads the model now only with QUANTFN_PRELOAD or under SnapStart


@lru_cache(maxsize=1)
def get_runner() -> JobRunner:
    import boto3

    return JobRunner(get_registry(), boto3.client("s3"), boto3.client("sqs"))


def queue_url_of(record: SQSRecord) -> str:
    """The queue for shards and follow-ups: the configured URL, else the one this record came from."""
    configured = get_registry().settings.batch.queue_url
    if configured:
        return configured
    _, _, _, region, account, name = record.event_source_arn.split(":", 5)
    return f"https://sqs.{region}.amazonaws.com/{account}/{name}"


class RetryLater(Exception):
    """Marks the message failed in the partial-batch reply, so SQS hands it out again (or its redrive moves it)."""


def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    runner = get_runner()
    where = {"function": lambda_context.function_name, "memory_mb": int(lambda_context.memory_limit_in_mb)}
    where |= {"request_id": lambda_context.aws_request_id, "threads": runner.settings.runtime.threads}
    receives = int(record.attributes.approximate_receive_count or 1)
    delivery = Delivery(queue_url_of(record), record.message_id, receives, where)
    outcome = runner.process(record.body, lambda_context.get_remaining_time_in_millis, delivery)
    # One record per message: what it did, or why it failed and what became of it (ids and codes, never input text).
    fields = outcome.log_fields() | {"message_id": record.message_id, "receives": receives, "status": outcome.status}
    metrics.add_metric(name="Jobs" + outcome.status.title().replace("_", ""), unit=MetricUnit.Count, value=1)
    for name, value in (("Lines", outcome.lines), ("Results", outcome.results), ("LineErrors", outcome.errors)):
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
    if outcome.failure is None:
        logger.info("job step done", extra=fields | {"chunks": outcome.chunks_done})
        return
    log = logger.warning if outcome.failure.action == "retry" else logger.error
    log("job message failed", extra=fields | outcome.failure.log_fields())
    metrics.add_metric(name="MessagesFailed", unit=MetricUnit.Count, value=1)
    if outcome.status == "retry":
        raise RetryLater(outcome.failure.code)


@capture_lambda_handler  # X-Ray in Lambda with Tracing: Active; a no-op locally
@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="Messages", unit=MetricUnit.Count, value=len(event.get("Records", [])))
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
