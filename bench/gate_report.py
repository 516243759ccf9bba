"""The gate's view of each recipe: its cosine distribution against fp32 on the gate corpus, and its worst texts.

Usage (from the repo root, after building the recipes, e.g. ``quantfn build-model --recipe R --out DIR``):
    HF_HUB_OFFLINE=1 PYTHONPATH=shared:. .venv/bin/python bench/gate_report.py --fp32 FP32_DIR [LABEL=]MODEL_DIR... \
        [--out bench/GATE.md]

``FP32_DIR`` is the fp32 original every rung was measured against (``DIR/.work/fp32-*-original``). Each
model answers the gate corpus (``quantfn.modelbuild.corpora``, never fitted to) through the runtime's task
pipeline (``evaluate.outputs``, cached in the quality cache). Writes a Markdown section: a table per recipe
(mean, 1st percentile, minimum, texts below 0.99 and 0.995, the worst kind), the cumulative distribution of
``1 - cosine`` beside it as a PNG, and each recipe's ten worst gate texts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.report import recipe_label
from quantfn.modelbuild import corpora, evaluate, metrics, quality
from quantfn.modelbuild.gate import Gate


def cosines(folder: Path, fp32: Path, texts: list[str], cache: Path) -> np.ndarray:
    got = evaluate.outputs(folder, {"gate": texts}, cache)["gate"]
    want = evaluate.outputs(fp32, {"gate": texts}, cache)["gate"]
    return metrics.cosines(got, want)


def plot(curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gate = Gate()
    figure, axes = plt.subplots(figsize=(8, 5))
    for name, cos in curves.items():
        error = np.sort(np.maximum(1 - cos, 1e-7))
        axes.plot(error, np.arange(1, len(error) + 1) / len(error), label=name)
    for value, label in ((gate.cosine_min, "min"), (gate.cosine_p1, "p1")):
        axes.axvline(1 - value, color="grey", linestyle=":", linewidth=1)
        axes.text(1 - value, 0.02, f" gate {label} {value}", rotation=90, color="grey", fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("1 - cosine against fp32 (gate corpus)")
    axes.set_ylabel("share of gate texts")
    axes.set_title("Cosine distribution per recipe (CDF), all-MiniLM-L6-v2")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders; LABEL=DIR names a folder's curve and row")
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/GATE.md"))
    args = parser.parse_args()
    cache = quality.cache_dir()
    _, gate = corpora.load(cache)
    kinds = np.array(gate.kinds)
    curves: dict[str, np.ndarray] = {}
    rows = ["| recipe | cos mean | p1 | min | < 0.99 | < 0.995 | worst kind (mean / min) | task retention min |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    worst = []
    for given in args.models:
        label, _, path = given.rpartition("=")
        folder = Path(path)
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        name = label or recipe_label(manifest["quantization"])
        cos = curves[name] = cosines(folder, args.fp32, gate.texts, cache)
        by_kind = {k: cos[kinds == k] for k in corpora.KINDS if (kinds == k).any()}
        kind = min(by_kind, key=lambda k: by_kind[k].mean())
        retention = manifest.get("quality", {}).get("retention_min")
        rows.append(
            f"| {name} | {cos.mean():.5f} | {np.percentile(cos, 1):.5f} | {cos.min():.5f} | {(cos < 0.99).sum()} | "
            f"{(cos < 0.995).sum()} | {kind} ({by_kind[kind].mean():.5f} / {by_kind[kind].min():.5f}) | "
            + ("-" if retention is None else f"{retention:.2%}")
            + " |"
        )
        worst.append(f"\n**{name}**\n\n| cosine | kind | text |\n|---|---|---|")
        for i in np.argsort(cos)[:10]:
            text = " ".join(gate.texts[i].split())
            text = (text[:110] + "...") if len(text) > 110 else text
            worst.append(f"| {cos[i]:.5f} | {gate.kinds[i]} | {text.replace('|', '/')} |")
    image = args.out.with_suffix(".png")
    plot(curves, image)
    record = gate.record()
    lines = [
        "## The gate corpus: each recipe against fp32",
        "",
        f"Gate corpus: {record['size']} texts ({', '.join(f'{k} {n}' for k, n in record['kinds'].items())}), "
        f"sha256 {record['sha256'][:16]}..., from {', '.join(record['sources'])}; no sentence shared with the "
        "calibration corpus. Gate: cosine mean >= 0.998, 1st percentile >= 0.995, min >= 0.99. Reproduce: "
        "`bench/gate_report.py` (its docstring).",
        "",
        *rows,
        "",
        f"![cosine CDF per recipe]({image.name})",
        "",
        "### The ten worst gate texts per recipe",
        *worst,
        "",
    ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
