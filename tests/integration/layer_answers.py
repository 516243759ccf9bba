"""Child process: every model under a models root answers fixed texts through quantfn's runtime path.

Run by tests/integration/test_arm64_layer.py twice, with the same code: on this machine's x86_64
Python, and as arm64 python3.13 under qemu with the arm64 runtime layer first on PYTHONPATH (as
/opt/python in Lambda) and shared/ (quantfn, as in the function artifact) after it.

    python layer_answers.py MODELS_ROOT TEXTS_JSON OUT_DIR

Each model is opened as the functions open it: ``layer:<id>`` through the model store (manifest read,
every file's sha256 verified), a session as the manifest says. Writes ``OUT_DIR/<id>.npy`` (embeddings
[n, d] for embedders, label scores [n, labels] for classifiers) and ``OUT_DIR/facts.json`` (machine,
onnxruntime's version and location, per model its task and labels). Standard library, numpy and quantfn
only: nothing else is in the layer.
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
from quantfn.models.reference import parse_model_ref
from quantfn.models.session import open_session
from quantfn.models.store import LocalModel, ModelStore


def answers(local: LocalModel, texts: list[str]) -> np.ndarray:
    """Embeddings or label scores for ``texts``, through the runtime's task code for the manifest's task."""
    from quantfn.tasks.embedding import EmbeddingModel, load_tokenizer

    manifest = local.manifest
    if manifest.task != "embed":
        raise SystemExit(f"{manifest.model_id}: task {manifest.task!r} has no runtime pipeline in this quantfn")
    session = open_session(local.path / "model.onnx", manifest, threads=1)
    model = EmbeddingModel(session, load_tokenizer(local.path / "tokenizer.json"), manifest)
    return model.embed(model.tokenize(texts))


def main(models_root: Path, texts_file: Path, out: Path) -> None:
    texts = json.loads(texts_file.read_text(encoding="utf-8"))
    store = ModelStore(Settings.from_env({"QUANTFN_MODELS_ROOT": str(models_root)}))
    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_file": onnxruntime.__file__,
        "models": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in models_root.iterdir() if (p / "manifest.json").is_file()):
        local = store.fetch(parse_model_ref(f"layer:{folder.name}"))
        np.save(out / f"{folder.name}.npy", answers(local, texts))
        facts["models"][folder.name] = {"task": local.manifest.task, "labels": list(local.manifest.labels)}
    (out / "facts.json").write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
