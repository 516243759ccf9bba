"""A change must not cost speed: this checkout against an earlier commit, side by side, on the same model files.

    python bench/before_after.py [--base 46f2764] [--rounds 8] [--threads 1] [--schema2]

The earlier commit is checked out into build/bench-base (git worktree); both serve the same default model
files (``--schema2``: for a base from before manifest schema 3, its folder gets them under a schema 2
manifest), or the base serves its own build of the model (``--base-models``: code and model against code and
model). Used for the many-models change (base a61b563, --schema2) and the task/route reshape (base 46f2764).
Rounds alternate which version goes first; each round is one fresh process per version (cold start to the
first answer, then warm batch-32 passes through the handler). Reported: medians of per-round ratios
(this / base) of cold start and of warm throughput. Writes bench/before_after.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "all-minilm-l6-v2"


def base_checkout(commit: str) -> Path:
    path = REPO / "build" / "bench-base"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True)
    else:
        subprocess.run(["git", "-C", str(path), "checkout", "-q", "--detach", commit], check=True)
    return path


def schema2_models(models: Path) -> Path:
    """The same model files under a schema 2 manifest, for code that reads schema 2 only."""
    root = REPO / "build" / "bench-base-models"
    target = root / MODEL_ID
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(models / MODEL_ID, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(schema=2, task="embedding")
    (target / "manifest.json").write_text(json.dumps(manifest))
    return root


def one(checkout: Path, models: Path, threads: int, passes: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": f"{checkout / 'shared'}:{checkout}",
        "QUANTFN_MODELS_ROOT": str(models),
        "QUANTFN_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "ERROR",
        "OPENBLAS_NUM_THREADS": "1",
    }
    for name in ("QUANTFN_MODEL", "QUANTFN_MODELS"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "before_after_child.py"), str(checkout), str(passes)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=checkout,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="46f2764")
    parser.add_argument("--schema2", action="store_true", help="the base reads manifest schema 2 only")
    parser.add_argument(
        "--base-models", type=Path, help="the base serves this models root (its own build); default: the same files"
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    models = REPO / "build" / "models"
    base = base_checkout(args.base)
    base_models = args.base_models or (schema2_models(models) if args.schema2 else models)
    cold, warm = [], []
    for round_ in range(args.rounds):
        runs = {}
        order = ("base", "this") if round_ % 2 == 0 else ("this", "base")
        for name in order:
            checkout, root = (base, base_models) if name == "base" else (REPO, models)
            runs[name] = one(checkout, root, args.threads, args.passes)
        cold.append(runs["this"]["cold_ms"] / runs["base"]["cold_ms"])
        warm.append(statistics.median(runs["this"]["texts_per_s"]) / statistics.median(runs["base"]["texts_per_s"]))
        print(
            f"round {round_ + 1}: cold {runs['this']['cold_ms']:.0f} vs {runs['base']['cold_ms']:.0f} ms, "
            f"warm {statistics.median(runs['this']['texts_per_s']):.0f} vs "
            f"{statistics.median(runs['base']['texts_per_s']):.0f} texts/s",
            flush=True,
        )
    result = {
        "base": args.base,
        "threads": args.threads,
        "rounds": args.rounds,
        "models": "the base's own build" if args.base_models else "the same files",
        "cold_start_ratio_median": round(statistics.median(cold), 4),
        "warm_throughput_ratio_median": round(statistics.median(warm), 4),
        "cold_start_ratios": [round(r, 4) for r in cold],
        "warm_throughput_ratios": [round(r, 4) for r in warm],
    }
    (REPO / "bench" / "before_after.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if "median" in k}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
