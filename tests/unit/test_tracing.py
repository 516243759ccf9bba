"""quantfn.tracing: off (and the X-Ray SDK never imported) outside Lambda; subsegments through Powertools when on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aws_lambda_powertools import Tracer

from quantfn import tracing
from quantfn.config import EndpointSettings, RuntimeSettings, Settings
from quantfn.endpoint import CallFailed, EndpointClient
from tests.conftest import ROOT, embed_on_endpoint


@pytest.fixture(autouse=True)
def no_tracer() -> Iterator[None]:
    tracing.set_tracer(None)
    yield
    tracing.set_tracer(None)


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),  # a local run or a test
        ({"LAMBDA_TASK_ROOT": "/var/task"}, True),
        ({"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "true"}, False),
        ({"LAMBDA_TASK_ROOT": "/var/task", "AWS_SAM_LOCAL": "true"}, False),
    ],
)
def test_tracing_is_on_only_in_lambda_and_not_when_disabled(monkeypatch, env: dict, enabled: bool) -> None:
    for name in ("LAMBDA_TASK_ROOT", "POWERTOOLS_TRACE_DISABLED", "AWS_SAM_LOCAL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.tracing_enabled() is enabled


def test_with_tracing_off_the_handlers_import_and_run_without_the_xray_sdk() -> None:
    code = (
        "import sys, functions.api.app, functions.batch.app\n"
        "from quantfn.tracing import subsegment\n"
        "with subsegment('model_fetch', model='m'):\n    pass\n"
        "print('aws_xray_sdk' in sys.modules)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'shared'}:{ROOT}", "AWS_DEFAULT_REGION": "us-east-1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_in_the_tracers_disabled_mode_subsegments_and_the_handler_wrapper_still_work() -> None:
    tracing.set_tracer(Tracer(service="quantfn-test", disabled=True))
    with tracing.subsegment("inference", inputs=3):
        pass
    assert tracing.capture_lambda_handler(lambda event, context: {"ok": event})({"a": 1}, None) == {"ok": {"a": 1}}


class RecordingProvider:
    """A Powertools tracing provider that records subsegments instead of sending them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.annotations: dict[str, dict] = {}

    @contextmanager
    def in_subsegment(self, name: str, **kwargs) -> Iterator[object]:
        self.names.append(name)
        provider = self

        class Segment:
            def put_annotation(self, key: str, value: object) -> None:
                provider.annotations.setdefault(name, {})[key] = value

        yield Segment()


def test_with_tracing_on_the_endpoint_call_session_creation_and_model_fetch_are_subsegments(model_dir) -> None:
    provider = RecordingProvider()
    tracing.set_tracer(Tracer(service="quantfn-test", provider=provider, auto_patch=False, disabled=True))
    tracing.get_tracer().provider = provider

    class Refusing:
        name = "refusing"

        def post(self, body: bytes, timeout_s: float) -> bytes:
            raise CallFailed("HTTP 500", retryable=False, status=500)

    client = EndpointClient(
        Settings(endpoint=EndpointSettings(url="http://unused", max_attempts=1)), transport=Refusing()
    )
    with pytest.raises(Exception, match="HTTP 500"):
        embed_on_endpoint(client, ["x"], "m", dimensions=4, normalized=False, deadline_s=1e12)
    from quantfn.models.manifest import Manifest
    from quantfn.models.reference import parse_model_ref
    from quantfn.models.session import open_session
    from quantfn.models.store import ModelStore

    open_session(model_dir / "model.onnx", Manifest.read(model_dir), threads=1)
    ModelStore(Settings(runtime=RuntimeSettings(models_root=model_dir.parent))).fetch(
        parse_model_ref(f"layer:{model_dir.name}")
    )
    assert provider.names == ["## endpoint_call", "## session_create", "## model_fetch"]
    assert provider.annotations["## model_fetch"] == {"model": model_dir.name, "source": "layer"}
    assert provider.annotations["## endpoint_call"] == {"endpoint": "refusing", "task": "embed"}
