"""What Lambda's SQS event source mapping does, against a real (moto) queue.

Receive a batch, invoke the handler with the SQS event Lambda would build,
delete the messages that succeeded, and leave failed ones invisible until their
visibility timeout lets them come back (or the redrive policy moves them to the
dead-letter queue).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
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
