"""Shared fixtures: the built model, a Lambda context, a moto server on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"
DEFAULT_MODEL_ID = "all-minilm-l6-v2"
INTENT_MODEL_ID = "intent-minilm-l6-v2"  # `make test` builds it beside the default (Makefile: INTENT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Never let a test reach real AWS: fixed fake credentials, a region, no IMDS.
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "quantfn-tests")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the default built model (``make test`` builds it into build/models first)."""
    prebuilt = Path(os.environ.get("QUANTFN_TEST_MODELS_ROOT", ROOT / "build" / "models"))
    if (prebuilt / DEFAULT_MODEL_ID / "manifest.json").is_file():
        return prebuilt
    from quantfn.modelbuild.pipeline import build_model

    out = tmp_path_factory.mktemp("models")
    build_model(out)
    return out


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The task-quality suite's data as small fake wheels in a cache folder (QUANTFN_QUALITY_CACHE):
    a build in a test downloads nothing."""
    from quantfn.config import get_settings
    from tests.quality_data import small_suite

    cache = small_suite(tmp_path_factory.mktemp("quality"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTFN_QUALITY_CACHE", str(cache))
        get_settings.cache_clear()
        yield cache
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def model_dir(models_root: Path) -> Path:
    return models_root / DEFAULT_MODEL_ID


@dataclass
class FakeLambdaContext:
    """The attributes Powertools reads from a real LambdaContext."""

    function_name: str = "quantfn-api"
    memory_limit_in_mb: int = 2048
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:quantfn-api"
    aws_request_id: str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    remaining_ms: int = 29_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    return FakeLambdaContext()


@pytest.fixture
def service_env(monkeypatch: pytest.MonkeyPatch, models_root: Path, tmp_path: Path) -> Iterator[None]:
    """Point quantfn at the built models through the environment, as Lambda would: the default embedder and,
    where it was built, the intent classifier (the template's default list)."""
    from quantfn.registry import reset_registry

    models = [DEFAULT_MODEL_ID] + ([INTENT_MODEL_ID] if (models_root / INTENT_MODEL_ID).is_dir() else [])
    monkeypatch.setenv("QUANTFN_MODELS", ",".join(f"{m}=layer:{m}" for m in models))
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(models_root))
    monkeypatch.setenv("QUANTFN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTFN_THREADS", "2")
    reset_registry()
    yield
    reset_registry()


def load_event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MotoServer:
    url: str

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10)


def wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers 2xx; kill ``process`` and fail if it dies or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:  # HTTPError (e.g. 503 while loading) is an OSError too
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto in server mode, a real process listening on 127.0.0.1 only."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(f"{url}/moto-api/", process, timeout_s=30, what="moto server")
    try:
        yield MotoServer(url)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """Every boto3 client in this test talks to the moto server, reset before the test."""
    moto_server.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    yield moto_server


def load_gpu_server():
    """containers/gpu/server.py as a module (the container's folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_server", ROOT / "containers" / "gpu" / "server.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@contextmanager
def gpu_container(models_root: Path, log_dir: Path, **env: str) -> Iterator[str]:
    """containers/gpu/serve as a separate process on 127.0.0.1 and a free port (CPU provider); its URL."""
    port = _free_port()
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "shared"), str(ROOT)]),
        "QUANTFN_MODELS": f"{DEFAULT_MODEL_ID}=layer:{DEFAULT_MODEL_ID}",
        "QUANTFN_MODELS_ROOT": str(models_root),
        "QUANTFN_GPU_PROVIDER": "cpu",
        "QUANTFN_SERVER_HOST": "127.0.0.1",
        "QUANTFN_SERVER_PORT": str(port),
        "QUANTFN_THREADS": "1",
        **env,
    }
    with (log_dir / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "containers" / "gpu" / "serve"), "serve"], env=full_env, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{url}/ping", process, timeout_s=60, what=f"GPU server (log: {log.name})")
        try:
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def embed_on_endpoint(
    client: Any, texts: list[str], model: str, *, dimensions: int, normalized: bool, deadline_s: float
) -> Any:
    """What the embed task asks of the GPU endpoint for ``texts`` (served there as ``model``), through the
    client's one call: its reply (``.output`` the checked vectors) or the error the call raises."""
    from quantfn.models.manifest import Manifest
    from quantfn.tasks import TASKS, EmbedRequest

    manifest = Manifest(
        "m", "embed", {}, dimensions, 256, ("input_ids", "attention_mask"), "last_hidden_state",
        normalize=normalized, upstream=model,
    )  # fmt: skip
    return TASKS["embed"].on_endpoint(EmbedRequest(list(texts), model), manifest, client, deadline_s)


@dataclass
class Printed:
    """What a handler printed: its Powertools log records, the EMF metrics (name -> dimension sets) and the text."""

    records: list[dict]
    metrics: dict[str, list[dict]]
    text: str

    def at(self, *levels: str) -> list[dict]:
        return [record for record in self.records if record.get("level") in levels]


class HandlerOutput:
    """Reads what a Lambda handler module printed. Powertools' Logger keeps the stdout it found when it was made
    (another test's capture, maybe), so its handlers are pointed here; EMF metrics are printed to sys.stdout."""

    def __init__(self, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
        import io
        import logging

        self.capsys, self.stream = capsys, io.StringIO()
        self.handlers = logging.getLogger(logger_name).handlers
        self.previous = [handler.stream for handler in self.handlers]
        for handler in self.handlers:
            handler.stream = self.stream  # not setStream(): it flushes the old stream, maybe a closed capture

    def read(self) -> Printed:
        out = self.capsys.readouterr()
        text = out.out + out.err + self.stream.getvalue()
        self.stream.seek(0)
        self.stream.truncate()
        records, metrics = [], {}
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            data = json.loads(line)
            if "_aws" not in data:
                records.append(data)
                continue
            for block in data["_aws"]["CloudWatchMetrics"]:
                dimensions = {name: data[name] for names in block["Dimensions"] for name in names}
                for metric in block["Metrics"]:
                    metrics.setdefault(metric["Name"], []).append({"namespace": block["Namespace"], **dimensions})
        return Printed(records, metrics, text)

    def close(self) -> None:
        for handler, previous in zip(self.handlers, self.previous, strict=True):
            handler.stream = previous


@contextmanager
def handler_output(logger_name: str, capsys: pytest.CaptureFixture[str]) -> Iterator[HandlerOutput]:
    output = HandlerOutput(logger_name, capsys)
    try:
        output.read()  # start from nothing
        yield output
    finally:
        output.close()


MATRYOSHKA_MODEL_ID = "minilm-matryoshka"  # the default model declared Matryoshka-trained (a test fixture only)
NO_RANGES_MODEL_ID = "minilm-no-ranges"  # the default model as built before int8 ranges existed
PROMPTED_MODEL_ID = "minilm-prompted"  # the default model with e5's prompts declared


@pytest.fixture(scope="session")
def typed_models_root(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with int8 ranges calibrated as the build calibrates them (on the calibration texts),
    beside three variants of it: Matryoshka sizes 256/128/64, no ranges, and e5's prompts."""
    import shutil

    from quantfn.modelbuild.embedding_ranges import add_to_published
    from quantfn.modelbuild.reference import load_corpus

    root = tmp_path_factory.mktemp("typed-models")
    calibration = load_corpus()[0::2]
    variants = {
        DEFAULT_MODEL_ID: ({}, ()),
        MATRYOSHKA_MODEL_ID: ({}, (256, 128, 64)),
        NO_RANGES_MODEL_ID: ({}, ()),
        PROMPTED_MODEL_ID: ({"prompts": {"query": "query: ", "document": "passage: "}}, ()),
    }
    for model_id, (extra, sizes) in variants.items():
        folder = root / model_id
        shutil.copytree(models_root / DEFAULT_MODEL_ID, folder)
        manifest = json.loads((folder / "manifest.json").read_text()) | extra | {"model_id": model_id}
        manifest.pop("embedding_ranges", None)
        manifest.pop("matryoshka_dimensions", None)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        if model_id != NO_RANGES_MODEL_ID:
            add_to_published(folder, calibration, sizes)
    return root


def typed_models_env(root: Path) -> dict[str, str]:
    """QUANTFN_MODELS and QUANTFN_MODELS_ROOT serving every model under ``typed_models_root``."""
    models = (DEFAULT_MODEL_ID, MATRYOSHKA_MODEL_ID, NO_RANGES_MODEL_ID, PROMPTED_MODEL_ID)
    return {"QUANTFN_MODELS": ",".join(f"{m}=layer:{m}" for m in models), "QUANTFN_MODELS_ROOT": str(root)}
