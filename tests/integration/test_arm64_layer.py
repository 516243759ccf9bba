"""The arm64 (Graviton) runtime layer, run here under qemu user-mode emulation, gives x86_64's answers.

The layer is the one `make build ARCH=arm64` deploys (``make runtime-layer ARCH=arm64``: the pinned
manylinux aarch64 wheels); the emulator and an arm64 python3.13 come from local/arm64_env.py
(idempotent, under build/arm64-env). Every published model folder under the models root is loaded
through quantfn's own runtime path (tests/integration/layer_answers.py) on both architectures, so
models built later join without a change here.

Emulated floating point is slow (seconds per short text), so the texts are few and short; this
proves the layer loads and computes the same answers, not how fast Graviton is. When the emulator
cannot be set up on this machine (no mmdebstrap and no root, no Debian mirror) the test is skipped
with the reason; in CI (``CI=true``) that fails instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

CHILD = Path(__file__).with_name("layer_answers.py")
LAYER = ROOT / "build" / "layers" / "runtime-arm64" / "python"
REQUIREMENTS = ROOT / "layers" / "runtime" / "requirements.txt"
CORPUS = ROOT / "shared" / "quantfn" / "modelbuild" / "data" / "fidelity_corpus.txt"
TEXT_COUNT = 8
MIN_COSINE = 0.999
EMULATED_TIMEOUT_S = 1800


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def arm64_env():
    sys.path.insert(0, str(ROOT / "local"))
    try:
        import arm64_env
    finally:
        sys.path.pop(0)
    try:
        return arm64_env.up()
    except arm64_env.SetupError as exc:
        if _in_ci():
            pytest.fail(f"the arm64 emulator must be set up in CI: {exc}", pytrace=False)
        pytest.skip(f"no arm64 emulator on this machine (local/arm64_env.py up): {exc}")


@pytest.fixture(scope="module")
def arm64_layer() -> Path:
    """build/layers/runtime-arm64/python, built by the Makefile when missing or stale."""
    # BIN: the venv running these tests (its pip downloads the wheels); -o: never reinstall that venv.
    command = ["make", "-s", "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}", "ARCH=arm64"]
    done = subprocess.run([*command, "runtime-layer"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"make runtime-layer ARCH=arm64 failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return LAYER


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("arm64") / "texts.json"
    path.write_text(json.dumps(lines[:TEXT_COUNT]))
    return path


def _answers(command: list[str], pythonpath: str, models_root: Path, texts: Path, out: Path, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(CHILD), str(models_root), str(texts), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{command[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return json.loads((out / "facts.json").read_text())


def _pinned(package: str) -> str:
    match = re.search(rf"^{package}==(\S+)", REQUIREMENTS.read_text(), flags=re.M)
    assert match, f"{package} is not pinned in {REQUIREMENTS}"
    return match.group(1)


def test_arm64_layer_loads_every_model_and_gives_x86_answers(arm64_env, arm64_layer, models_root, texts, tmp_path):
    # Given every published model folder, the arm64 layer under emulation and this machine's x86_64 runtime
    published = sorted(p.name for p in models_root.iterdir() if (p / "manifest.json").is_file())
    assert published, f"no model folder under {models_root}"
    shared = str(ROOT / "shared")

    # When both run the same texts through quantfn's runtime path
    x86 = _answers([sys.executable], shared, models_root, texts, tmp_path / "x86_64", timeout=600)
    arm = _answers(
        arm64_env.python_command(),
        f"{arm64_layer}{os.pathsep}{shared}",
        models_root,
        texts,
        tmp_path / "arm64",
        timeout=EMULATED_TIMEOUT_S,
    )

    # Then the arm64 process ran aarch64 code from the layer, with the pinned onnxruntime
    assert arm["machine"] == "aarch64"
    assert Path(arm["onnxruntime_file"]).is_relative_to(arm64_layer)
    assert arm["onnxruntime"] == _pinned("onnxruntime") == x86["onnxruntime"]
    assert sorted(arm["models"]) == sorted(x86["models"]) == published
    # And every model gives x86_64's answers: embeddings with cosine >= 0.999, classifiers the same top label
    for model_id, facts in x86["models"].items():
        ours, theirs = (np.load(tmp_path / arch / f"{model_id}.npy") for arch in ("x86_64", "arm64"))
        assert ours.shape == theirs.shape, model_id
        if facts["task"] == "classify":
            assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all(), model_id
        elif facts["task"] == "rerank":  # scores of the first text against every text: the same best document
            assert ours.argmax() == theirs.argmax(), model_id
        else:
            cosine = (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
            assert cosine.min() >= MIN_COSINE, (model_id, cosine.round(6).tolist())
