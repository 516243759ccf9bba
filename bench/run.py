"""`make bench`: every comparison side by side in one run, written to bench/REPORT.md and bench/results.json.

    PYTHONPATH=shared:. .venv/bin/python bench/run.py [--repeats 5] [--quick]

Needs the default model (make model), the fp32 model (quantfn build-model --recipe fp32) and, for
the PyTorch baselines, the `reference` extra (torch 2.13.0 CPU, sentence-transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import cost, report, sections
from bench.measure import REPO, start_moto

MODELS = REPO / "build" / "models"
DEFAULT = MODELS / "all-minilm-l6-v2"


def ensure_model(recipe: str, gated: bool = True) -> Path:
    """The default model's build with ``recipe``, built if absent: held to its gate, or (``gated=False``, the
    frontier's recipes) built whatever its figures, which the frontier then reports."""
    folder = DEFAULT if recipe == "default" else MODELS / f"all-minilm-l6-v2-{recipe}"
    if not (folder / "manifest.json").is_file():
        if gated:
            command = [sys.executable, "-m", "quantfn.cli", "build-model", "--recipe", recipe, "--out", str(MODELS)]
            subprocess.run(command, check=True)
        else:
            from bench.quant_frontier import OPEN_GATE
            from quantfn.modelbuild.pipeline import build_model

            build_model(MODELS, recipe=recipe, gate=OPEN_GATE)
    return folder


def start_moto_with_model() -> tuple[subprocess.Popen, str]:
    import boto3

    process, url = start_moto()
    s3 = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench"
    )
    s3.create_bucket(Bucket="bench-models")
    for path in DEFAULT.iterdir():
        s3.upload_file(str(path), "bench-models", f"models/all-minilm-l6-v2/{path.name}")
    return process, url


# What template.yaml's Globals set for every function; the baselines run as a user would run them.
FUNCTION_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def layer_env() -> dict[str, str]:
    """A function's environment serving the default model from the layer (``build/models``)."""
    return base_env() | FUNCTION_ENV | {"QUANTFN_MODEL": "layer:all-minilm-l6-v2", "QUANTFN_MODELS_ROOT": str(MODELS)}


def serve_in_process() -> None:
    """This process's environment as ``layer_env``'s quantfn settings, for the handler measured in process (and
    the children it spawns). Metrics stay on: flushing them is part of what the handler costs (to a null sink)."""
    os.environ.update({k: v for k, v in layer_env().items() if k.startswith(("QUANTFN_", "POWERTOOLS_"))})
    os.environ.pop("POWERTOOLS_METRICS_DISABLED", None)


def base_env(threads: int = 2) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTFN_", "AWS_", "OPENBLAS_"))}
    env |= {
        "PYTHONPATH": f"{REPO / 'shared'}:{REPO}",
        "HF_HUB_OFFLINE": "1",
        "QUANTFN_REPO": str(REPO),
        "QUANTFN_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "POWERTOOLS_METRICS_DISABLED": "true",
        # as template.yaml deploys the functions (LogLevel INFO): each request writes its log record (and its
        # EMF metrics) to a null sink, as it would to CloudWatch
        "POWERTOOLS_LOG_LEVEL": "INFO",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return env


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    from quantfn.modelbuild.source import locate_source

    source_dir = locate_source().folder
    ensure_model("default")
    fp32 = ensure_model("fp32")
    results: dict[str, Any] = {"machine": report.machine()}

    moto, moto_url = start_moto_with_model()
    try:
        layer = layer_env()
        s3_env = (
            base_env()
            | FUNCTION_ENV
            | {
                "QUANTFN_MODEL": "s3://bench-models/models/all-minilm-l6-v2/",
                "AWS_ENDPOINT_URL": moto_url,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
                "QUANTFN_CACHE_DIR": f"/tmp/quantfn-bench-cache-{os.getpid()}-{time.time_ns()}",
            }
        )
        cases = {
            "quantfn handler (layer)": ("handler", layer, ""),
            "quantfn handler (S3 via moto)": ("handler", s3_env, ""),
            # the same handler without the template's OPENBLAS_NUM_THREADS=1: what that one line buys
            "quantfn handler (layer), OpenBLAS default threads": (
                "handler",
                {k: v for k, v in layer.items() if k not in FUNCTION_ENV},
                "",
            ),
            "onnxruntime fp32": ("ort-fp32", base_env(), str(fp32)),
            "sentence-transformers fp32": ("st-torch", base_env(), str(source_dir)),
        }
        # each S3 cold start must download: a fresh cache folder per spawn
        original = sections.cold_start

        def fresh_cache(mode: str, env: dict[str, str], target: str = "") -> dict[str, Any]:
            if "AWS_ENDPOINT_URL" in env:
                env = env | {"QUANTFN_CACHE_DIR": f"/tmp/quantfn-bench-cache-{time.time_ns()}"}
            return original(mode, env, target)

        sections.cold_start = fresh_cache
        print("cold starts ...", flush=True)
        results["cold_start"] = sections.cold_starts(cases, 2 * repeats)  # cheap, and the noisiest section
        results["import_time"] = sections.import_time_top(layer)
    finally:
        moto.terminate()

    serve_in_process()
    print("warm: handler, onnxruntime fp32, sentence-transformers ...", flush=True)
    by_threads = {t: sections.warm_side_by_side(fp32, source_dir, t, repeats, FUNCTION_ENV) for t in (1, 2)}
    results["warm"] = {name: {t: by_threads[t][name] for t in (1, 2)} for name in by_threads[1]}
    print("frontier ...", flush=True)
    folders = [ensure_model(r, gated=r in ("default", "fp32")) for r in report.FRONTIER_RECIPES]
    results["frontier"] = report.frontier(folders, repeats)
    print("task quality (quantfn eval) ...", flush=True)
    results["quality"] = report.quality(folders, fp32)

    warm = results["warm"]
    per_request = {t: warm["quantfn"][t]["batch1"]["p50_ms"] / 1000 for t in (1, 2)}
    per_embedding = {t: 1 / warm["quantfn"][t]["length_sorted"]["inputs_per_s"] for t in (1, 2)}
    handler_cold = results["cold_start"]["quantfn handler (layer)"]
    results["cost"] = sections.lambda_cost(per_request, per_embedding, handler_cold["wall_s"], cold_rate=0.01)
    batch = json.loads((REPO / "bench" / "batch.json").read_text())  # make bench runs batch_throughput.py first
    results["token_cost"] = cost.table(results["cost"], batch, cost.tokens_per_text(DEFAULT))
    results["headline"] = report.headline(results)
    results["headline"]["usd_per_million_tokens"] = cost.usd_per_million_tokens(results["token_cost"])
    (REPO / "bench" / "results.json").write_text(json.dumps(results["headline"], indent=2) + "\n")
    (REPO / "bench" / "full_results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    report.write(results, REPO / "bench")
    print(json.dumps(results["headline"], indent=2))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
