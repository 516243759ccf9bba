"""``make models`` report: for each built folder its size, where it fits, fidelity and speed.

``python -m quantfn.modelbuild.model_report MODELS_DIR WEIGHTS_DIR`` prints a Markdown table.
Task quality is the manifest's ``quality`` record (the build's gate against the fp32
original: Lee & Pincombe Spearman and the Rotten Tomatoes probe for embedders, top-1
agreement for the classifier). Speed is texts/s at batch 32 on 1 thread through the runtime's task pipeline
(``evaluate.answers``), on the fidelity corpus. Two extra checks: the intent classifier against its scikit-learn
head on the stored fp32 embeddings, and paraphrase-MiniLM-L3-v2's similarity structure
against MiniLM-L6's (a wrong vocabulary would leave no correlation).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from quantfn.modelbuild.evaluate import answers, items_for
from quantfn.modelbuild.metrics import spearman_pairwise
from quantfn.modelbuild.reference import load_corpus, load_reference
from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline


def _speed(folder: Path, manifest: Manifest, texts: list[str]) -> tuple[float, np.ndarray]:
    pipeline = open_pipeline(folder, manifest, threads=1)
    items = items_for(manifest.pair, texts)
    answers(pipeline, items[:32])
    start = time.perf_counter()
    out = answers(pipeline, items)
    return len(items) / (time.perf_counter() - start), out


def report(models: Path, weights: Path, texts: int = 256) -> str:
    corpus = load_corpus()[:texts]
    rows = [
        "| model | task | MB | size vs fp32 | fits | fidelity vs fp32 | task quality (retention of fp32) "
        "| texts/s (b32, 1 thread) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes, vectors = [], {}
    for path in sorted(models.glob("*/manifest.json")):
        folder, manifest = path.parent, Manifest.read(path.parent)
        rate, out = _speed(folder, manifest, corpus)
        vectors[manifest.model_id] = out
        f = manifest.fidelity
        shown = ", ".join(f"{k} {v}" for k, v in f.items() if isinstance(v, float) and k != "cosine_min")
        fits = manifest.raw.get("deploy", {}).get("fits", "?")
        tasks = manifest.raw.get("quality", {}).get("tasks", {})
        quality = ", ".join(f"{k} {t['score']:.4f} ({t['retention']:.2%})" for k, t in tasks.items()) or "-"
        size = manifest.raw.get("size_ratio_vs_fp32", "?")
        rows.append(f"| {manifest.model_id} | {manifest.task} | {manifest.total_size / 2**20:.1f} | {size} | {fits} "
                    f"| {shown} | {quality} | {rate:.0f} |")  # fmt: skip
    if "paraphrase-minilm-l3-v2" in vectors and "all-minilm-l6-v2" in vectors:
        rho = spearman_pairwise(vectors["paraphrase-minilm-l3-v2"], vectors["all-minilm-l6-v2"])
        notes.append(f"- L3 vs L6 pairwise-similarity Spearman on {texts} texts: {rho:.3f} (vocabulary check)")
    head = weights / "intent/rag_intent_classifier/models/LogisticRegression.joblib"
    if "intent-minilm-l6-v2" in vectors and head.is_file():
        from quantfn.modelbuild.heads import load_sklearn_linear

        coef, intercept, _ = load_sklearn_linear(head)
        sklearn = (load_reference()[:texts] @ coef.T + intercept).argmax(1)
        agree = float((vectors["intent-minilm-l6-v2"].argmax(1) == sklearn).mean())
        notes.append(f"- intent int8 top-1 vs scikit-learn on stored fp32 embeddings: {agree:.4f} ({texts} texts)")
    return "\n".join([*rows, "", *notes]) + "\n"


if __name__ == "__main__":
    print(report(Path(sys.argv[1]), Path(sys.argv[2])))
