"""`quantfn eval` on the built default model, through the runtime's task pipeline (small fake suite wheels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantfn.cli import main
from quantfn.modelbuild import quality
from tests.quality_data import small_suite


def test_given_a_model_and_itself_as_fp32_when_evaluated_then_every_task_is_kept_in_full(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = small_suite(tmp_path / "cache")
    assert main(["eval", str(model_dir), "--fp32", str(model_dir), "--cache", str(cache), "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "| all-minilm-l6-v2 |" in table and "100.00%" in table and "rotten_tomatoes" in table
    # the outputs were cached by the model's file digests, and they are the runtime pipeline's vectors
    outputs = {part: np.load(next((cache / "outputs").glob(f"{part}-*.npy"))) for part in ("corpus", "lee")}
    assert outputs["corpus"].shape == (300, 384)  # the gate corpus (the tests' small one)
    assert np.allclose(np.linalg.norm(outputs["lee"], axis=1), 1.0, atol=1e-5)


def test_given_no_fp32_build_beside_a_model_when_evaluated_then_the_command_says_how_to_make_one(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lonely = tmp_path / "models" / model_dir.name
    shutil.copytree(model_dir, lonely)
    assert main(["eval", str(lonely), "--cache", str(small_suite(tmp_path / "cache"))]) == 2
    assert "--recipe fp32" in capsys.readouterr().err


def test_given_record_when_evaluated_then_the_manifest_holds_the_quality_record(
    model_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    cache = small_suite(tmp_path / "cache")
    rows = quality.run_eval([copy], fp32=model_dir, cache=cache, threads=1, record=True)
    record = json.loads((copy / "manifest.json").read_text())["quality"]
    assert record["retention_min"] == pytest.approx(rows[0].quality.retention_min, abs=1e-6) == 1.0
    assert set(record["tasks"]) == {"lee", "rotten_tomatoes"}
