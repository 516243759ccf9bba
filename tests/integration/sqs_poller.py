"""What Lambda's SQS event source mapping does, against a real (moto) queue.

Receive a batch, invoke the handler with the SQS event Lambda would build,
delete the messages that succeeded, and leave failed ones invisible until their
visibility timeout lets them come back (or the redrive policy moves them to the
dead-letter queue).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class EventSourceMapping:
    def __init__(self, sqs: Any, queue_url: str, queue_arn: str, handler: Callable, context_factory: Callable) -> None:
        self.sqs, self.queue_url, self.queue_arn = sqs, queue_url, queue_arn
        self.handler, self.context_factory = handler, context_factory
        self.invocations = 0
        self.failures: list[str] = []  # message ids reported failed, in order

    def poll_once(self, batch_size: int = 5) -> int:
        reply = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=batch_size,
            WaitTimeSeconds=1,
            MessageSystemAttributeNames=["All"],
        )
        messages = reply.get("Messages", [])
        if not messages:
            return 0
        event = {"Records": [self._record(m) for m in messages]}
        self.invocations += 1
        try:
            result = self.handler(event, self.context_factory())
            failed = {item["itemIdentifier"] for item in result.get("batchItemFailures", [])}
        except Exception:  # the whole invocation failed: every message returns
            failed = {m["MessageId"] for m in messages}
        self.failures += sorted(failed)
        for message in messages:
            if message["MessageId"] not in failed:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return len(messages)

    def drain(self, timeout_s: float = 120, between: Callable[[], None] | None = None) -> None:
        """Poll until the queue holds nothing visible or in flight; bounded by ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll_once()
            if between:
                between()
            attributes = self.sqs.get_queue_attributes(
                QueueUrl=self.queue_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
            if attributes["ApproximateNumberOfMessages"] == "0" == attributes["ApproximateNumberOfMessagesNotVisible"]:
                return
        raise AssertionError(f"queue not drained within {timeout_s}s")

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": {},
            "md5OfBody": hashlib.md5(message["Body"].encode()).hexdigest(),
            "eventSource": "aws:sqs",
            "eventSourceARN": self.queue_arn,
            "awsRegion": "us-east-1",
        }


# -- a poller process: what one Lambda execution environment is, for the fan-out tests and bench ------------
@dataclass
class TimedContext:
    """A Lambda context whose remaining time really runs down from ``budget_ms``."""

    budget_ms: int
    function_name: str = "quantfn-batch"
    memory_limit_in_mb: int = 1769
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:quantfn-batch"
    aws_request_id: str = "poller"

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.budget_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


class _Faults:
    """Faults injected into the real runner, chosen by command-line flags."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.shard, self.receives, self.chunks = args, None, 0, 0

    def on_message(self, body: str, receives: int) -> None:
        self.shard = json.loads(body).get("shard", {}).get("index")
        self.receives = receives

    def _failing(self) -> bool:
        return self.shard == self.args.fail_shard and self.receives <= self.args.fail_times

    def kill_on_chunk(self, infer: Callable) -> Callable:
        """Die on this process's Nth chunk, as a crashed environment does (no cleanup); or fail before a chunk."""

        def dying(*args: Any, **kwargs: Any) -> Any:
            self.chunks += 1
            if self.args.kill_at_chunk and self.shard is not None and self.chunks == self.args.kill_at_chunk:
                os._exit(137)
            if self.args.fail_before_chunk and self._failing():
                raise RuntimeError(f"injected failure of shard {self.shard}, receive {self.receives}")
            return infer(*args, **kwargs)

        return dying

    def fail_after_a_chunk(self, put: Callable) -> Callable:
        """Raise just after the shard wrote a chunk (at its progress write), on the message's first N receives."""

        def failing(s3: Any, bucket: str, key: str, body: str) -> None:
            if "/progress/" in key and not self.args.fail_before_chunk and self._failing():
                raise RuntimeError(f"injected failure of shard {self.shard}, receive {self.receives}")
            put(s3, bucket, key, body)

        return failing


def main(argv: list[str] | None = None) -> int:
    """Poll until the queue has nothing visible or in flight for ``--idle-s`` seconds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue-url", required=True)
    parser.add_argument("--queue-arn", required=True)
    parser.add_argument("--budget-ms", type=int, default=60_000)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--kill-at-chunk", type=int, default=0, help="die on this process's Nth chunk")
    parser.add_argument("--fail-shard", type=int, default=-1, help="fail this shard after a chunk ...")
    parser.add_argument("--fail-times", type=int, default=0, help="... on its first N receives")
    parser.add_argument("--fail-before-chunk", action="store_true", help="... before its first chunk instead")
    parser.add_argument("--duplicate-shard", type=int, default=-1, help="send a copy of this shard's message ...")
    parser.add_argument("--once-file", default="", help="... once in all pollers (created O_EXCL)")
    parser.add_argument("--redeliver-plan", action="store_true", help="leave a job message undeleted once")
    args = parser.parse_args(argv)

    import boto3

    from functions.batch import app
    from quantfn.batch import runner, shards

    faults = _Faults(args)
    runner.infer_chunk = faults.kill_on_chunk(runner.infer_chunk)
    shards.put = faults.fail_after_a_chunk(shards.put)
    sqs = boto3.client("sqs")
    mapping = EventSourceMapping(sqs, args.queue_url, args.queue_arn, app.lambda_handler, None)
    redelivered: set[str] = set()

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        (record,) = event["Records"]
        body, receives = record["body"], int(record["attributes"].get("ApproximateReceiveCount", "1"))
        faults.on_message(body, receives)
        shard = json.loads(body).get("shard", {}).get("index")
        if shard == args.duplicate_shard and args.once_file:
            try:
                os.close(os.open(args.once_file, os.O_CREAT | os.O_EXCL))
                sqs.send_message(QueueUrl=args.queue_url, MessageBody=body)  # a second delivery, now
            except FileExistsError:
                pass
        reply = app.lambda_handler(event, TimedContext(args.budget_ms))
        if args.redeliver_plan and shard is None and record["messageId"] not in redelivered:
            redelivered.add(record["messageId"])  # as if the invocation timed out after planning
            return {"batchItemFailures": [{"itemIdentifier": record["messageId"]}]}
        return reply

    mapping.handler = handler
    mapping.context_factory = lambda: None
    idle_since = None
    while True:
        if mapping.poll_once(batch_size=1):
            idle_since = None
            continue
        attributes = sqs.get_queue_attributes(
            QueueUrl=args.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        if attributes["ApproximateNumberOfMessages"] == "0" == attributes["ApproximateNumberOfMessagesNotVisible"]:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > args.idle_s:
                return 0
        else:
            idle_since = None


if __name__ == "__main__":
    raise SystemExit(main())
