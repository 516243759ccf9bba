"""Child process: every model under a models root answers fixed texts through quantfn's runtime path.

Run by tests/integration/test_arm64_layer.py twice, with the same code: on this machine's x86_64
Python, and as arm64 python3.13 under qemu with the arm64 runtime layer first on PYTHONPATH (as
/opt/python in Lambda) and shared/ (quantfn, as in the function artifact) after it.

    python layer_answers.py MODELS_ROOT TEXTS_JSON OUT_DIR

Each model is served as the functions serve it: the registry (``QUANTFN_MODELS``-style list of
``layer:<id>`` references; the model store reads the manifest and verifies every file's sha256) opens the
manifest's task pipeline. Writes ``OUT_DIR/<id>.npy`` (embeddings [n, d]; label scores [n, labels] for
classifiers; scores of the first text against every text for rerankers) and ``OUT_DIR/facts.json``
(machine, onnxruntime's version and location, per model its task and labels). Standard library, numpy
and quantfn only: nothing else is in the layer.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from quantfn.config import Settings
from quantfn.registry import Registry
from quantfn.tasks import ClassifyPipeline, EmbedPipeline, Pipeline, RerankPipeline


def answers(pipeline: Pipeline, texts: list[str]) -> np.ndarray:
    """What the manifest's task answers for ``texts``."""
    if isinstance(pipeline, EmbedPipeline):
        return pipeline.embed(texts)
    if isinstance(pipeline, ClassifyPipeline):
        return pipeline.classify(texts)
    if isinstance(pipeline, RerankPipeline):
        return pipeline.score(texts[0], texts)
    raise SystemExit(f"{pipeline.manifest.model_id}: no answer for task {pipeline.manifest.task!r}")


def main(models_root: Path, texts_file: Path, out: Path) -> None:
    texts = json.loads(texts_file.read_text(encoding="utf-8"))
    published = sorted(p.name for p in models_root.iterdir() if (p / "manifest.json").is_file())
    settings = Settings.from_env({"QUANTFN_MODELS_ROOT": str(models_root), "QUANTFN_THREADS": "1"})
    registry = Registry(settings, models=[(name, f"layer:{name}") for name in published])
    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_file": onnxruntime.__file__,
        "models": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    for model in registry.models:
        pipeline = registry.pipeline(model)
        np.save(out / f"{model.name}.npy", answers(pipeline, texts))
        facts["models"][model.name] = {"task": pipeline.manifest.task, "labels": list(pipeline.manifest.labels)}
        registry.forget(model)  # one model loaded at a time, whatever the memory budget
    (out / "facts.json").write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
