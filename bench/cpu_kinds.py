"""Speed and fidelity per x86 CPU kind, on this one host: its own kernels, then AVX-512 VNNI and AVX2 by CPUID mask.

    HF_HUB_OFFLINE=1 PYTHONPATH=shared:. .venv/bin/python bench/cpu_kinds.py [--repeats 5] [--kinds native avx512 avx2]

For each kind a child process runs under ``bench.cpu_mask`` (CPUID answered with that kind's bits cleared, so
onnxruntime's MLAS loads the kind's int8 and fp32 kernels): the handler-end-to-end side by side of ``make
bench`` (``sections.warm_side_by_side``: quantfn's handler, plain onnxruntime fp32, sentence-transformers,
interleaved, medians of per-round ratios) at 1 and 2 threads, and the default model's cosine against the fp32
build on the gate corpus computed with that kind's kernels (the gate itself ran on the build host's). Each
kind's figures replace its row in ``bench/cpu_kinds.json``, marked as emulated on this host; the rows are
printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import cpu_mask, report, sections
from bench.measure import REPO
from bench.run import DEFAULT, FUNCTION_ENV, MODELS, ensure_model, serve_in_process

FP32 = MODELS / "all-minilm-l6-v2-fp32"


def fidelity(folder: Path, fp32: Path) -> dict[str, float]:
    """``folder``'s cosine against ``fp32`` on the gate corpus, both answered here (no cache: this kind's kernels)."""
    from quantfn.modelbuild import corpora, evaluate, metrics

    texts = corpora.load()[1].texts
    got = evaluate.outputs(folder, {"gate": texts})["gate"]
    want = evaluate.outputs(fp32, {"gate": texts})["gate"]
    cosines = metrics.cosines(got, want)
    return {
        "gate_texts": len(texts),
        "gate_cosine_mean": round(float(cosines.mean()), 5),
        "gate_cosine_p1": round(float(np.percentile(cosines, 1)), 5),
        "gate_cosine_min": round(float(cosines.min()), 5),
    }


def measure(repeats: int) -> dict[str, Any]:
    """This process's kind: the speed figures of ``make bench``'s headline and the default's fidelity."""
    from quantfn.modelbuild.source import locate_source

    serve_in_process()
    warm = {t: sections.warm_side_by_side(FP32, locate_source().folder, t, repeats, FUNCTION_ENV) for t in (1, 2)}
    ours = {t: warm[t]["quantfn"] for t in (1, 2)}
    return {
        **report.speed_figures(ours),
        "batch1_p50_ms_1_thread": ours[1]["batch1"]["p50_ms"],
        "batch1_p50_ms": ours[2]["batch1"]["p50_ms"],
        "texts_per_s_1_thread": ours[1]["length_sorted"]["inputs_per_s"],
        "texts_per_s": ours[2]["length_sorted"]["inputs_per_s"],
        **fidelity(DEFAULT, FP32),
    }


def child(kind: str, repeats: int) -> dict[str, Any]:
    """``measure`` in a process of its own, under the kind's CPUID mask (``native``: none)."""
    env = os.environ.copy() if kind == "native" else cpu_mask.environment(kind)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--child", out.name, "--repeats", str(repeats)]
        subprocess.run(command, env=env, check=True, cwd=REPO)
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["native", "avx512", "avx2"], choices=["native", *cpu_mask.KINDS])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child).write_text(json.dumps({"machine": report.machine(), "figures": measure(args.repeats)}))
        return 0
    ensure_model("default")
    ensure_model("fp32")
    rows: list[dict[str, Any]] = []
    for kind in args.kinds:
        print(f"{kind} ...", flush=True)
        got = child(kind, args.repeats)
        host = got["machine"]
        # an emulated kind keeps a row of its own beside a real host's of that kind
        row = {
            "cpu": host["cpu"] + ("" if kind == "native" else f", CPUID masked to {kind} (bench/cpu_mask.py)"),
            "date": host["date"][:10],
            "how": "bench/cpu_kinds.py (handler end to end, interleaved, medians of per-round ratios)",
            **got["figures"],
        }
        rows = report.record_kind(host["int8_kernel"] + ("" if kind == "native" else ", emulated: CPUID mask"), row)
    print(report.table(rows, ["int8 kernel", "cpu", "date", *report.SPEED_FIGURES, *report.KIND_FIDELITY]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
