"""Where a model's time goes: onnxruntime's per-op profile at batch 32 and batch 1, on this host.

Usage (from the repo root):
    HF_HUB_OFFLINE=1 PYTHONPATH=shared .venv/bin/python bench/op_profile.py MODEL_DIR [--threads 1] [--rounds 3]

The session is opened as ``quantfn.models.session.create_session`` opens it (the manifest's optimization
level, config entries and weights rebuilt at load), plus ``enable_profiling``. It runs the gate corpus's
texts in length-sorted batches of 32 (``--rounds`` passes over its first 640 texts) and 200 of them one at
a time, then sums the profile's node events per op type: microseconds per pass and the share of the run.
Prints Markdown tables and the host's int8 kernel (``bench.report.int8_kernel``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.report import machine
from quantfn.modelbuild import corpora, quality
from quantfn.models.manifest import Manifest
from quantfn.models.session import SLOW_CPU_FUSIONS, dequantized_weights
from quantfn.tasks import load_tokenizer


def profiled_session(folder: Path, threads: int, prefix: str) -> tuple[object, Manifest]:
    import onnxruntime as ort

    manifest = Manifest.read(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if manifest.pre_optimized
        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    for key, value in manifest.session_config.items():
        options.add_session_config_entry(key, value)
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    weights = dequantized_weights(folder, manifest.dequantize_at_load) if manifest.dequantize_at_load else []
    values = [ort.OrtValue.ortvalue_from_numpy(array) for _, array in weights]
    for (name, _), value in zip(weights, values, strict=True):
        options.add_initializer(name, value)
    disabled = None if manifest.pre_optimized else list(SLOW_CPU_FUSIONS)
    session = ort.InferenceSession(str(folder / "model.onnx"), options, disabled_optimizers=disabled)
    session.keep = values
    return session, manifest


def by_op(profile: Path) -> dict[str, float]:
    """Microseconds per op type over the whole profile (node events only)."""
    totals: dict[str, float] = defaultdict(float)
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return dict(totals)


def run(folder: Path, threads: int, batches: list[list[list[int]]], passes: int, tmp: Path) -> dict[str, float]:
    session, _ = profiled_session(folder, threads, str(tmp / "profile"))
    names = {i.name for i in session.get_inputs()}
    for _ in range(passes):
        for ids in batches:
            width = max(len(i) for i in ids)
            feed = {
                "input_ids": np.array([i + [0] * (width - len(i)) for i in ids], np.int64),
                "attention_mask": np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids], np.int64),
            }
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            session.run(None, {k: v for k, v in feed.items() if k in names})
    totals = by_op(Path(session.end_profiling()))
    return {op: us / passes for op, us in totals.items()}


def table(title: str, totals: dict[str, float]) -> str:
    whole = sum(totals.values())
    lines = [f"**{title}** ({whole / 1000:.1f} ms of kernels per pass)", "", "| op | ms | share |", "|---|---|---|"]
    for op, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        if us / whole >= 0.005:
            lines.append(f"| {op} | {us / 1000:.2f} | {us / whole:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts = corpora.load(quality.cache_dir())[1].texts[:640]
    tokenizer = load_tokenizer(args.model / "tokenizer.json")
    encoded = [e.ids[:256] for e in tokenizer.encode_batch(texts)]  # the runtime truncates at 256 too
    order = np.argsort([len(i) for i in encoded], kind="stable")
    batch32 = [[encoded[j] for j in order[i : i + 32]] for i in range(0, len(order), 32)]
    batch1 = [[encoded[j]] for j in range(200)]
    host = machine()
    print(f"{host['cpu']}, int8 kernel {host['int8_kernel']}; {args.model.name}, {args.threads} thread(s)\n")
    with tempfile.TemporaryDirectory() as tmp:
        for title, batches in ((f"batch 32, {len(texts)} gate texts", batch32), ("batch 1, 200 gate texts", batch1)):
            print(table(title, run(args.model, args.threads, batches, args.rounds, Path(tmp))), end="\n\n")


if __name__ == "__main__":
    main()
