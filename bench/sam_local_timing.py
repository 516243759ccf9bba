"""Cold and warm `sam local invoke` of the API function, measured on this machine -> bench/sam_local.json.

cold: SAM's function image removed first, so the invoke builds it from the base image (adds the
      emulator and both layers), starts a container and loads the model: a developer's first run.
warm: the same command again (Docker's build cache hit); SAM still starts a fresh container per
      invoke, so this includes the Python runtime's start and the model load.
served: `sam local start-lambda` with a warm container, the second request onward: the function only.

    python bench/sam_local_timing.py [--build-dir .aws-sam/build] [--runs 3]

Uses the offline setup of local/sam_local_env.py (engine, base image, proxy); nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "local")]

import sam_local_env  # noqa: E402

from tests.e2e.sam_cli import SAM, SamLocal, sam_environment, write_e2e_template  # noqa: E402

EVENT = ROOT / "events" / "api-embeddings.json"
REPORT = re.compile(r"REPORT RequestId: \S+\s+Init Duration: ([\d.]+) ms\s+Duration: ([\d.]+) ms")


def timed_invoke(sam: SamLocal) -> dict:
    started = time.perf_counter()
    reply, logs = sam.invoke("ApiFunction", EVENT)
    wall = time.perf_counter() - started
    assert reply["statusCode"] == 200, reply
    match = REPORT.search(logs)
    return {"wall_s": round(wall, 2), "function_ms": float(match.group(2)) if match else None}


def remove_function_images(env: dict[str, str]) -> int:
    listed = subprocess.run(
        [sam_local_env.DOCKER, "images", "--format", "{{.Repository}}:{{.Tag}}", "samcli/lambda-python"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for image in listed:
        subprocess.run([sam_local_env.DOCKER, "rmi", "-f", image], env=env, capture_output=True, check=True)
    return len(listed)


def served_ms(sam: SamLocal, runs: int) -> list[float]:
    with sam.serve("start-lambda") as url:
        client = boto3.client(
            "lambda",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(read_timeout=300, retries={"total_max_attempts": 1}),
        )
        payload = EVENT.read_bytes()
        timings = []
        for _ in range(runs + 1):
            started = time.perf_counter()
            client.invoke(FunctionName="ApiFunction", Payload=payload)["Payload"].read()
            timings.append(round((time.perf_counter() - started) * 1000, 1))
        return timings[1:]  # the first one loads the model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, default=ROOT / ".aws-sam" / "build")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "sam_local.json")
    args = parser.parse_args()

    docker_env = sam_local_env.up()
    with tempfile.TemporaryDirectory(prefix="sam-local-timing-") as scratch:
        scratch_dir = Path(scratch)
        template = write_e2e_template(args.build_dir, scratch_dir / "template.json")
        env = sam_environment(docker_env, scratch_dir)
        sam = SamLocal(template, env, scratch_dir)
        removed = remove_function_images(env)
        cold = timed_invoke(sam)
        warm = [timed_invoke(sam) for _ in range(args.runs)]
        served = served_ms(sam, args.runs)
    version = subprocess.run([str(SAM), "--version"], capture_output=True, text=True).stdout.strip()
    engine = subprocess.run(
        [sam_local_env.DOCKER, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "what": "sam local invoke ApiFunction -e events/api-embeddings.json (layer model, 2048 MB)",
        "cold_s": cold["wall_s"],
        "warm_s": statistics.median(r["wall_s"] for r in warm),
        "warm_runs_s": [r["wall_s"] for r in warm],
        "function_ms": {"cold": cold["function_ms"], "warm": [r["function_ms"] for r in warm]},
        "served_warm_container_ms": statistics.median(served),
        "served_runs_ms": served,
        "cold_removed_images": removed,
        "model_onnx_bytes": next((args.build_dir / "ModelLayer" / "models").glob("*/model.onnx")).stat().st_size,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "sam_cli": version,
        "docker_engine": engine,
        "image": sam_local_env.base_image_tag(sam_local_env.template_runtime()) + " (built offline)",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
