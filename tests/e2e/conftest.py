"""The e2e tier: the real SAM CLI and the Lambda runtime emulator in Docker, only on 127.0.0.1.

Every test here is marked ``e2e``. The session prepares Docker, the Lambda base image and the
host-network proxy (local/sam_local_env.py, idempotent), runs `make build` when the `sam build`
output is older than its sources, and serves moto on 127.0.0.1 for the functions' AWS calls.

If any of that fails the tier fails, loudly. A developer without Docker may opt out with
``QUANTFN_SKIP_E2E=1`` (the tests are then reported as skipped); CI (``CI=true``) refuses that.
``QUANTFN_E2E_BUILD_DIR`` tests an existing `sam build` output instead of running `make build`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.conftest import DEFAULT_MODEL_ID, MotoServer
from tests.e2e.sam_cli import ROOT, SAM, SamLocal, sam_environment, write_e2e_template
from tests.integration.test_authorizer import seed_example_keys

BUILD_DIR = ROOT / ".aws-sam" / "build"
BUILD_INPUTS = [
    "template.yaml",
    "Makefile",
    "functions",
    "shared/quantfn",
    "layers",
    f"build/models/{DEFAULT_MODEL_ID}",
]
SKIP_VARIABLE = "QUANTFN_SKIP_E2E"
KEYS_PREFIX = "/quantfn/e2e/keys/"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _skip_or_fail(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"e2e tier cannot run in CI: {reason}", pytrace=False)
    pytest.fail(f"{reason} (set {SKIP_VARIABLE}=1 to skip the e2e tier on this machine)", pytrace=False)


@pytest.fixture(scope="session")
def docker_env() -> dict[str, str]:
    """Docker engine, the Lambda base image and the proxy: the environment SAM needs."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        if _in_ci():
            pytest.fail(f"{SKIP_VARIABLE}=1 is not allowed in CI: the e2e tier must run", pytrace=False)
        pytest.skip(f"{SKIP_VARIABLE}=1: the sam local tier was skipped on request")
    if not SAM.exists():
        _skip_or_fail(f"no SAM CLI at {SAM} (make test installs it)")
    sys.path.insert(0, str(ROOT / "local"))
    try:
        import sam_local_env
    finally:
        sys.path.pop(0)
    try:
        return sam_local_env.up()
    except (SystemExit, subprocess.CalledProcessError, OSError) as exc:
        _skip_or_fail(f"Docker for sam local could not be prepared: {exc}")
        raise


def _newest_mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts), default=0)


@pytest.fixture(scope="session")
def built_dir() -> Path:
    """The `sam build` output; `make build` first when it is missing or older than its sources."""
    if os.environ.get("QUANTFN_E2E_BUILD_DIR"):
        return Path(os.environ["QUANTFN_E2E_BUILD_DIR"])
    built = BUILD_DIR / "template.yaml"
    sources = [ROOT / p for p in BUILD_INPUTS if (ROOT / p).exists()]
    if not built.exists() or built.stat().st_mtime < max(_newest_mtime(p) for p in sources):
        done = subprocess.run(["make", "-s", "build"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"make build failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return BUILD_DIR


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def sam_template(built_dir: Path, e2e_dir: Path) -> Path:
    return write_e2e_template(built_dir, e2e_dir / "template.json")


@pytest.fixture(scope="session")
def aws_resources(moto_server: MotoServer) -> dict[str, str]:
    """What the sample events point at, created once in moto: buckets, input file, job queue."""
    from tests.integration.test_batch_jobs import write_jsonl

    moto_server.reset()
    s3 = boto3.client("s3", endpoint_url=moto_server.url)
    for bucket in ("quantfn-example-input", "quantfn-example-output", "quantfn-e2e-models"):
        s3.create_bucket(Bucket=bucket)
    write_jsonl(s3, "quantfn-example-input", "corpus/sentences.jsonl", 20, {})
    queue_url = boto3.client("sqs", endpoint_url=moto_server.url).create_queue(QueueName="quantfn-jobs")["QueueUrl"]
    seed_example_keys(boto3.client("ssm", endpoint_url=moto_server.url), KEYS_PREFIX)
    return {"endpoint": moto_server.url, "queue_url": queue_url, "keys_prefix": KEYS_PREFIX}


@pytest.fixture(scope="session")
def sam(docker_env: dict[str, str], sam_template: Path, e2e_dir: Path, aws_resources: dict[str, str]) -> SamLocal:
    """SAM on the e2e template; every function's AWS calls go to moto on 127.0.0.1."""
    logs = e2e_dir / "logs"
    logs.mkdir(exist_ok=True)
    endpoint = {"AWS_ENDPOINT_URL": aws_resources["endpoint"]}
    env_vars = {
        "ApiFunction": endpoint,
        "BatchFunction": {**endpoint, "QUANTFN_BATCH_QUEUE_URL": aws_resources["queue_url"]},
        # the template's AuthMode default is KEY: every API request passes the authorizer, reading keys from moto
        "AuthorizerFunction": {**endpoint, "QUANTFN_AUTH_KEYS_PREFIX": KEYS_PREFIX, "QUANTFN_AUTH_CACHE_SECONDS": "0"},
    }
    return SamLocal(sam_template, sam_environment(docker_env, e2e_dir), logs, env_vars)


@pytest.fixture(scope="module")
def lambda_endpoint(sam: SamLocal) -> Iterator[str]:
    """One `sam local start-lambda` per module (warm containers for every function, stopped after)."""
    with sam.serve("start-lambda") as url:
        yield url


@pytest.fixture(scope="module")
def api_endpoint(sam: SamLocal) -> Iterator[str]:
    with sam.serve("start-api") as url:
        yield url
