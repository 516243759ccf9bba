"""The dashboard and alarms read metrics the code emits: a renamed metric or dimension cannot blind one silently.

Every metric template.yaml refers to (alarms, the dashboard's widgets, metric filters) is read with its
namespace and dimension set. The three handlers then run in this process through the cases that emit their
metrics (a cold start, a good request, a 4xx, a refusal, the GPU route failing until its circuit opens, a
batch job, a bad job message, accepted and refused keys, the key store down), and what they print (EMF and
log records) is read back. Each ``quantfn`` metric the template names must have been emitted with exactly
that name and dimension set; a metric made by a metric filter must match a log record the code wrote; an
``AWS/*`` metric must be one that service publishes, with its dimensions, on this template's resources.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.conftest import DEFAULT_MODEL_ID, FakeLambdaContext, Printed, handler_output, load_event
from tests.integration.test_template import handler_routes, template  # noqa: F401 (fixture)

# What each AWS namespace publishes that the template may use: metric names, and the dimension sets they carry.
AWS_METRICS: dict[str, tuple[set[str], list[set[str]]]] = {
    "AWS/ApiGateway": (
        {"Count", "4xx", "5xx", "Latency", "IntegrationLatency", "DataProcessed"},
        [{"ApiId"}, {"ApiId", "Stage"}, {"ApiId", "Method", "Resource", "Stage"}],  # HTTP APIs (v2)
    ),
    "AWS/SQS": ({"ApproximateNumberOfMessagesVisible", "ApproximateAgeOfOldestMessage"}, [{"QueueName"}]),
    "AWS/Lambda": ({"Throttles", "Errors", "Invocations", "Duration", "ConcurrentExecutions"}, [{"FunctionName"}]),
}
# The resource each AWS dimension must name, as the template writes it.
AWS_DIMENSION_VALUES = {
    "ApiId": {"${HttpApi}"},
    "QueueName": {"${JobDeadLetterQueue.QueueName}"},
    "FunctionName": {"${ApiFunction}", "${BatchFunction}"},
    "Stage": {"$default"},
}
# The function names the handlers run under here, for the template's references to the deployed names.
FUNCTION_NAMES = {"${ApiFunction}": "quantfn-api", "${BatchFunction}": "quantfn-batch"}


@dataclass(frozen=True)
class MetricRef:
    namespace: str
    name: str
    dimensions: tuple[tuple[str, str], ...]  # sorted; a value is a literal or "${LogicalId}" as the template has it
    where: str


def _value(value: Any) -> str:
    """A dimension value as text: a literal, or ``${X}`` / ``${X.Attr}`` for a Ref / GetAtt."""
    if isinstance(value, dict) and "Ref" in value:
        return f"${{{value['Ref']}}}"
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return f"${{{'.'.join(value['Fn::GetAtt'])}}}"
    assert isinstance(value, str), value
    return value


def _from_metric(metric: dict[str, Any], where: str) -> MetricRef:
    dimensions = tuple(sorted((d["Name"], _value(d["Value"])) for d in metric.get("Dimensions", [])))
    return MetricRef(metric["Namespace"], metric["MetricName"], dimensions, where)


def template_metrics(template: dict[str, Any]) -> list[MetricRef]:  # noqa: F811
    """Every metric the template's alarms, dashboard widgets and metric filters name."""
    refs: list[MetricRef] = []
    for name, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            if "MetricName" in props:
                refs.append(_from_metric(props, name))
            refs += [
                _from_metric(m["MetricStat"]["Metric"], name) for m in props.get("Metrics", []) if "MetricStat" in m
            ]
        elif resource["Type"] == "AWS::CloudWatch::Dashboard":
            body = props["DashboardBody"]
            widgets = json.loads(body["Fn::Sub"] if isinstance(body, dict) else body)["widgets"]
            for widget in (w for w in widgets if w["type"] == "metric"):
                for entry in widget["properties"]["metrics"]:
                    if isinstance(entry[0], dict):
                        continue  # a metric-math expression over the entries it names by id
                    assert entry[0] != "." and entry[1] != ".", f"{name}: write each metric out in full: {entry}"
                    fields = [e for e in entry if not isinstance(e, dict)]
                    pairs = tuple(sorted(zip(fields[2::2], fields[3::2], strict=True)))
                    refs.append(MetricRef(fields[0], fields[1], pairs, f"{name}: {widget['properties']['title']}"))
        elif resource["Type"] == "AWS::Logs::MetricFilter":
            for made in props["MetricTransformations"]:
                dimensions = tuple(sorted((made.get("Dimensions") or {}).items()))
                refs.append(MetricRef(made["MetricNamespace"], made["MetricName"], dimensions, name))
    return refs


def metric_filters(template: dict[str, Any]) -> dict[str, tuple[str, str, str]]:  # noqa: F811
    """metric name -> (log group's logical id, field, value) of each ``{ $.field = "value" }`` filter."""
    filters = {}
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Logs::MetricFilter":
            props = resource["Properties"]
            match = re.fullmatch(r'\{\s*\$\.(\w+)\s*=\s*"([^"]*)"\s*\}', props["FilterPattern"])
            assert match, f"a filter pattern this test cannot read: {props['FilterPattern']}"
            for made in props["MetricTransformations"]:
                filters[made["MetricName"]] = (props["LogGroupName"]["Ref"], *match.groups())
    return filters


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _emitted(printed: Printed) -> set[tuple[str, str, tuple[tuple[str, str], ...]]]:
    return {
        (dims["namespace"], name, tuple(sorted((k, v) for k, v in dims.items() if k != "namespace")))
        for name, sets in printed.metrics.items()
        for dims in sets
    }


@pytest.fixture
def api_run(service_env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Printed]:
    """The API handler through a cold start, a good request, a 4xx, a refusal, and the GPU route failing until its
    circuit opens."""
    from aws_lambda_powertools.metrics.provider.base import reset_cold_start_flag_provider

    from functions.api import app
    from quantfn.registry import reset_registry

    context = FakeLambdaContext(function_name=FUNCTION_NAMES["${ApiFunction}"])
    with handler_output(app.logger.name, capsys) as output:
        reset_cold_start_flag_provider()
        assert app.lambda_handler(load_event("api-embeddings.json"), context)["statusCode"] == 200
        assert app.lambda_handler(load_event("api-bad-json.json"), context)["statusCode"] == 400
        assert app.lambda_handler(load_event("api-embeddings-oversized.json"), context)["statusCode"] == 413
        # an endpoint that refuses every connection: the route goes there, fails (5xx), and the circuit opens
        monkeypatch.setenv("QUANTFN_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        monkeypatch.setenv("QUANTFN_ENDPOINT_MAX_ATTEMPTS", "1")
        monkeypatch.setenv("QUANTFN_ENDPOINT_BREAKER_FAILURES", "1")
        reset_registry()
        for _ in range(2):
            assert app.lambda_handler(load_event("api-embeddings-oversized.json"), context)["statusCode"] >= 500
        yield output.read()


@pytest.fixture
def batch_run(aws, models_root: Path, tmp_path: Path, monkeypatch, capsys) -> Iterator[Printed]:
    """The batch handler through a cold start, a job that completes and a message that fails."""
    from aws_lambda_powertools.metrics.provider.base import reset_cold_start_flag_provider

    from functions.batch import app
    from quantfn.registry import reset_registry
    from tests.integration.test_batch_jobs import TimedContext

    monkeypatch.setenv("QUANTFN_MODEL", f"layer:{DEFAULT_MODEL_ID}")
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(models_root))
    monkeypatch.setenv("QUANTFN_CACHE_DIR", str(tmp_path))
    reset_registry()
    app.get_runner.cache_clear()
    boto3.client("s3").create_bucket(Bucket="out-bucket")
    job = {"job_id": "m", "model": "all-MiniLM-L6-v2", "input": {"texts": [{"id": 1, "text": "a"}, {"id": 2}]}}
    event = load_event("sqs-batch-job.json")
    context = TimedContext(budget_ms=60_000, function_name=FUNCTION_NAMES["${BatchFunction}"])
    with handler_output(app.logger.name, capsys) as output:
        reset_cold_start_flag_provider()
        event["Records"][0]["body"] = json.dumps(job | {"output": "s3://out-bucket/o/"})
        assert app.lambda_handler(event, context) == {"batchItemFailures": []}
        shard = {"index": 0, "count": 1, "start": 0, "end": 2}
        event["Records"][0]["body"] = json.dumps(job | {"shard": shard, "checkpoint": {"chunk": "x"}})  # refused
        assert app.lambda_handler(event, context)["batchItemFailures"]
        yield output.read()
    app.get_runner.cache_clear()
    reset_registry()


@pytest.fixture
def authorizer_run(aws, monkeypatch, capsys) -> Iterator[Printed]:
    """The authorizer accepting a key, refusing one, and failing on a key store that is down."""
    from functions.authorizer import app
    from quantfn.auth.store import KeyStoreUnavailable
    from quantfn.config import get_settings
    from tests.integration.test_authorizer import PREFIX, seed_example_keys

    monkeypatch.setenv("QUANTFN_AUTH_KEYS_PREFIX", PREFIX)
    seed_example_keys(boto3.client("ssm"))
    get_settings.cache_clear()
    app.get_store.cache_clear()
    context = FakeLambdaContext(function_name="quantfn-authorizer")
    with handler_output(app.logger.name, capsys) as output:
        assert app.lambda_handler(load_event("authorizer-key-valid.json"), context)["isAuthorized"]
        assert not app.lambda_handler(load_event("authorizer-key-wrong-secret.json"), context)["isAuthorized"]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        app.get_store.cache_clear()
        with pytest.raises(KeyStoreUnavailable):
            app.lambda_handler(load_event("authorizer-key-unknown.json"), context)
        yield output.read()
    app.get_store.cache_clear()
    get_settings.cache_clear()


def test_every_quantfn_metric_the_template_names_is_emitted_with_that_name_and_dimension_set(
    template,  # noqa: F811
    api_run: Printed,
    batch_run: Printed,
    authorizer_run: Printed,
) -> None:
    runs = {"ApiFunctionLogs": api_run, "BatchFunctionLogs": batch_run, "AuthorizerFunctionLogs": authorizer_run}
    emitted = set().union(*(_emitted(run) for run in runs.values()))
    filters = metric_filters(template)
    ours = [ref for ref in template_metrics(template) if ref.namespace == "quantfn"]
    assert len({ref.name for ref in ours}) >= 15  # the dashboard and the alarms do read the code's metrics
    for ref in ours:
        if ref.name in filters:  # made from a log record by a metric filter: the code must write that record
            group, field, value = filters[ref.name]
            assert any(record.get(field) == value for record in runs[group].records), (ref, field, value)
            continue
        dimensions = tuple((k, FUNCTION_NAMES.get(v, v)) for k, v in ref.dimensions)
        assert ("quantfn", ref.name, dimensions) in emitted, (
            f"{ref.where} reads {ref.name} with dimensions {dict(ref.dimensions)}, which no handler emitted; "
            f"emitted with that name: {sorted(e for e in emitted if e[1] == ref.name)}"
        )


def test_every_aws_metric_the_template_names_is_published_by_that_service_for_this_stacks_resources(
    template,  # noqa: F811
) -> None:
    routes = {(method.upper(), path) for path, method in handler_routes().items()}
    refs = [ref for ref in template_metrics(template) if ref.namespace != "quantfn"]
    assert {ref.namespace for ref in refs} == set(AWS_METRICS)
    for ref in refs:
        names, dimension_sets = AWS_METRICS[ref.namespace]
        dimensions = dict(ref.dimensions)
        assert ref.name in names and set(dimensions) in dimension_sets, ref
        for key, value in dimensions.items():
            if key in AWS_DIMENSION_VALUES:
                assert value in AWS_DIMENSION_VALUES[key], ref
        if "Resource" in dimensions:  # a per-route metric names a route the API serves
            assert (dimensions["Method"], dimensions["Resource"]) in routes, ref


def test_the_dashboards_log_panels_query_records_the_handlers_write(
    template,  # noqa: F811
    api_run: Printed,
    batch_run: Printed,
) -> None:
    runs = {"${ApiFunctionLogs}": api_run, "${BatchFunctionLogs}": batch_run}
    body = json.loads(template["Resources"]["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"])
    panels = [w["properties"]["query"] for w in body["widgets"] if w["type"] == "log"]
    assert len(panels) == 2
    for query in panels:
        group, fields, message = re.fullmatch(
            r"SOURCE '(\$\{\w+\})' \| fields @timestamp, ([\w, ]+) \| filter message = '([^']+)' .*", query
        ).groups()
        records = [r for r in runs[group].records if r.get("message") == message]
        assert records, (group, message)
        # every field the panel shows is in some such record
        for name in fields.split(", "):
            assert any(name in record for record in records), (message, name)
