"""A model.onnx is never silently wrong: plain onnxruntime either answers as quantfn does or refuses the file.

Checked on every published folder under the models root (the default model and whatever
`make models` built) and on a tiny model built here with the weight-only (dequantize-at-load)
recipe; `quantfn export` then writes a standalone file that plain onnxruntime runs right.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from quantfn.cli import main
from quantfn.modelbuild import Gate
from quantfn.modelbuild.evaluate import answers, items_for
from quantfn.modelbuild.reference import load_corpus
from quantfn.modelbuild.standalone import write_standalone
from quantfn.models.manifest import Manifest
from quantfn.models.session import open_session
from quantfn.tasks import PIPELINES, load_tokenizer


def _published(models_root: Path) -> list[Path]:
    return sorted(p.parent for p in models_root.glob("*/manifest.json"))


@pytest.fixture(scope="module")
def tiny_weight_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT built weight-only (the default's fallback): model.onnx plus weights.bin."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from quantfn.modelbuild.architectures import plan_build
    from quantfn.modelbuild.pipeline import build_model
    from quantfn.modelbuild.source import locate_source, read_hf_folder

    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("plain")
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    transformers.BertModel(config, add_pooling_layer=False).eval().save_pretrained(root / "hf")
    shutil.copy(locate_source().tokenizer, root / "hf" / "tokenizer.json")
    source = read_hf_folder(root / "hf")
    plan = plan_build(source, model_id="tiny", normalize=True)
    build_model(
        root / "models",
        source,
        plan,
        recipe="int8-weight",
        gate=Gate(
            task_retention=None,
            cosine_mean=0.99,
            cosine_min=None,
            batch_invariance_min_cosine=0.999,
            max_size_ratio=None,
        ),
        corpus_size=96,
    )
    return root / "models" / "tiny"


def _outputs(folder: Path, session) -> np.ndarray:
    """The runtime's task pipeline for ``folder``, on ``session`` (quantfn's own, or plain onnxruntime's)."""
    manifest = Manifest.read(folder)
    pipeline = PIPELINES[manifest.task](session, load_tokenizer(folder / "tokenizer.json"), manifest)
    return answers(pipeline, items_for(manifest.pair, load_corpus()[:48]))


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def _check(folder: Path, tmp_path: Path) -> str:
    manifest = Manifest.read(folder)
    want = _outputs(folder, open_session(folder / "model.onnx", manifest, threads=1))
    try:
        plain = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as exc:  # refused: the only other acceptable outcome
        assert manifest.dequantize_at_load is not None, f"{folder.name}: a complete model.onnx failed to load: {exc}"
        outcome = "refused"
    else:
        assert _agree(_outputs(folder, plain), want) >= 0.999, f"{folder.name}: plain onnxruntime disagrees"
        outcome = "matches"
    standalone = write_standalone(folder, tmp_path / f"{folder.name}.onnx")
    exported = ort.InferenceSession(str(standalone), providers=["CPUExecutionProvider"])
    assert _agree(_outputs(folder, exported), want) >= 0.999
    return outcome


def test_given_a_dequantize_at_load_folder_when_plain_onnxruntime_opens_it_then_it_refuses(
    tiny_weight_only: Path, tmp_path: Path
) -> None:
    assert "weights.bin" in Manifest.read(tiny_weight_only).files
    assert _check(tiny_weight_only, tmp_path) == "refused"


def test_given_every_published_folder_when_opened_plainly_then_it_matches_or_raises(
    models_root: Path, tmp_path: Path
) -> None:
    folders = _published(models_root)
    assert folders, f"no model folders under {models_root}"
    for folder in folders:
        _check(folder, tmp_path)


def test_given_the_export_command_when_run_then_it_writes_a_standalone_onnx(
    tiny_weight_only: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tiny_weight_only), str(tmp_path / "out.onnx")]) == 0
    assert "standalone ONNX" in capsys.readouterr().out
    ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
