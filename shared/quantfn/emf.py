"""The functions' CloudWatch metrics: Powertools Metrics, with an EMF provider that does its per-request work once.

A request adds six or seven metrics and flushes them as one EMF document. Powertools' provider validates
each metric's name, unit and resolution on every call, formats a debug message for it, and writes the
document with ``json.dumps``: about 75 us of the 510 the API handler spent outside onnxruntime on one text
(bench/QUANTIZATION.md round 15). ``RequestMetricsProvider`` validates a (name, unit, resolution) the
first time it is added and writes the document with orjson. The document is the one Powertools writes
(``serialize_metric_set`` is Powertools' own); the decorator, the cold-start metric and the limits are
Powertools'.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import orjson
from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.constants import MAX_METRICS

NAMESPACE = "quantfn"


class RequestMetricsProvider(AmazonCloudWatchEMFProvider):
    """Powertools' EMF provider; a metric seen before with the same unit and resolution is not validated again."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._valid: dict[tuple[str, Any, Any], tuple[str, int]] = {}

    def add_metric(self, name: str, unit: Any, value: float, resolution: Any = 60) -> None:
        valid = self._valid.get((name, unit, resolution))
        metric = self.metric_set.get(name)
        values = metric["Value"] if metric is not None else None
        if (
            valid is None
            or not isinstance(value, numbers.Number)
            or len(self.metric_set) >= MAX_METRICS - 1
            or (values is not None and len(values) >= MAX_METRICS - 1)
        ):  # first sight, a bad value, or near a limit: Powertools' own path (its checks, its flush at 100)
            super().add_metric(name=name, unit=unit, value=value, resolution=resolution)
            added = self.metric_set.get(name)
            if added is not None:
                self._valid[(name, unit, resolution)] = (added["Unit"], added["StorageResolution"])
            return
        if values is None:
            unit_value, resolution_value = valid
            self.metric_set[name] = {"Unit": unit_value, "StorageResolution": resolution_value, "Value": []}
            values = self.metric_set[name]["Value"]
        values.append(float(value))

    def flush_metrics(self, raise_on_empty_metrics: bool = False) -> None:
        if not self.metric_set or is_metrics_disabled():
            super().flush_metrics(raise_on_empty_metrics=raise_on_empty_metrics)  # its warning, error or no-op
            return
        document = self.serialize_metric_set()
        try:
            text = orjson.dumps(document).decode()
        except TypeError:  # metadata orjson refuses (a lone surrogate): written as Powertools writes it
            text = json.dumps(document, separators=(",", ":"))
        print(text)
        self.clear_metrics()


def function_metrics(service: str) -> Metrics:
    """The Metrics a function's handler decorates with and adds to (namespace ``quantfn``)."""
    return Metrics(provider=RequestMetricsProvider(namespace=NAMESPACE, service=service))  # Metrics delegates all
