"""The functions' EMF provider writes what Powertools' own provider writes, and refuses what it refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_lambda_powertools.metrics import MetricUnitError, MetricValueError
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider

from quantfn.emf import RequestMetricsProvider

REQUEST = [  # (name, unit, value): what the API handler adds for one served request
    ("Requests", "Count", 1),
    ("RoutedLocal", "Count", 1.0),
    ("TokenizeMs", "Milliseconds", 0.09),
    ("InferenceMs", "Milliseconds", 3.2),
    ("InputTokens", "Count", 20),
    ("Inputs", "Count", 1),
]


def _requests(provider: AmazonCloudWatchEMFProvider, count: int, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    """``count`` requests' metrics and metadata, each flushed; the EMF documents printed, timestamps removed."""
    documents = []
    for request in range(count):
        for name, unit, value in REQUEST:
            provider.add_metric(name=name, unit=unit, value=value * (request + 1))
        provider.add_metadata(key="route_reason", value="within_limits \udc80")  # orjson refuses a lone surrogate
        provider.flush_metrics()
        for line in capsys.readouterr().out.splitlines():
            document: dict[str, Any] = json.loads(line)
            assert isinstance(document["_aws"].pop("Timestamp"), int)
            documents.append(document)
    return documents


def test_given_the_same_requests_then_the_same_documents_as_powertools(capsys: pytest.CaptureFixture[str]) -> None:
    stock = AmazonCloudWatchEMFProvider(namespace="quantfn", service="quantfn-api")
    ours = RequestMetricsProvider(namespace="quantfn", service="quantfn-api")
    want = _requests(stock, 3, capsys)
    got = _requests(ours, 3, capsys)
    assert len(got) == 3 and got == want
    assert got[2]["InferenceMs"] == [pytest.approx(9.6)] and got[0]["route_reason"] == "within_limits \udc80"


def test_given_a_hundred_values_of_one_metric_then_powertools_flush_at_its_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ours = RequestMetricsProvider(namespace="quantfn", service="quantfn-batch")
    for index in range(150):
        ours.add_metric(name="Items", unit="Count", value=index)
    first = json.loads(capsys.readouterr().out)  # printed at the 100th value, as Powertools does
    assert first["Items"] == [float(i) for i in range(100)]
    ours.flush_metrics()
    assert json.loads(capsys.readouterr().out)["Items"] == [float(i) for i in range(100, 150)]


def test_given_a_bad_unit_or_value_then_refused_even_for_a_metric_seen_before() -> None:
    ours = RequestMetricsProvider(namespace="quantfn", service="quantfn-api")
    ours.add_metric(name="Requests", unit="Count", value=1)
    with pytest.raises(MetricUnitError):
        ours.add_metric(name="Requests", unit="Counts", value=1)
    with pytest.raises(MetricValueError):
        ours.add_metric(name="Requests", unit="Count", value="1")  # type: ignore[arg-type]
    assert ours.metric_set["Requests"]["Value"] == [1.0]
