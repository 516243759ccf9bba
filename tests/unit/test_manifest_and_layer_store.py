"""The manifest and the layer store refuse what does not match, before onnxruntime sees it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantfn.config import RuntimeSettings, Settings
from quantfn.errors import IntegrityError, ModelUnavailable
from quantfn.models.manifest import Manifest, describe_file, verify_folder
from quantfn.models.reference import parse_model_ref
from quantfn.models.store import ModelStore


def make_model_folder(root: Path, model_id: str = "tiny") -> Path:
    folder = root / model_id
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 40)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    manifest = {
        "schema": 3,
        "model_id": model_id,
        "task": "embed",
        "files": {name: describe_file(folder / name) for name in ("model.onnx", "tokenizer.json")},
        "dimensions": 4,
        "max_sequence_length": 16,
        "inputs": ["input_ids", "attention_mask"],
        "output": "last_hidden_state",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_an_intact_folder_verifies(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path)
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)
    assert manifest.total_size == (folder / "model.onnx").stat().st_size + (folder / "tokenizer.json").stat().st_size


def test_one_flipped_byte_is_refused(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"sha256 of model\.onnx"):
        verify_folder(folder, Manifest.read(folder))


def test_a_truncated_file_is_refused_as_incomplete(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="incomplete"):
        verify_folder(folder, Manifest.read(folder))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"tokenizer\.json is missing"):
        verify_folder(folder, Manifest.read(folder))


@pytest.mark.parametrize(
    "mutate", [lambda m: m.pop("files"), lambda m: m["files"].update({"../x": {"sha256": "0", "size": 1}})]
)
def test_an_invalid_manifest_is_refused(tmp_path: Path, mutate) -> None:
    folder = make_model_folder(tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    mutate(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelUnavailable, match="manifest is invalid"):
        Manifest.read(folder)


def test_layer_store_returns_the_verified_folder(tmp_path: Path) -> None:
    make_model_folder(tmp_path)
    store = ModelStore(Settings(runtime=RuntimeSettings(models_root=tmp_path)))
    local = store.fetch(parse_model_ref("layer:tiny"))
    assert (local.path, local.source, local.manifest.model_id) == (tmp_path / "tiny", "layer", "tiny")


def test_layer_store_refuses_a_tampered_layer(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "2.0"}')
    with pytest.raises(IntegrityError):
        ModelStore(Settings(runtime=RuntimeSettings(models_root=tmp_path))).fetch(parse_model_ref("layer:tiny"))


def test_layer_store_names_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="not in the model layer"):
        ModelStore(Settings(runtime=RuntimeSettings(models_root=tmp_path))).fetch(parse_model_ref("layer:absent"))


def test_a_manifest_for_another_model_is_refused(tmp_path: Path) -> None:
    make_model_folder(tmp_path, "tiny")
    (tmp_path / "tiny").rename(tmp_path / "other")
    with pytest.raises(IntegrityError, match="manifest names model tiny"):
        ModelStore(Settings(runtime=RuntimeSettings(models_root=tmp_path))).fetch(parse_model_ref("layer:other"))


def _dequantize_entry(offset: int = 0) -> dict:
    return {
        "file": "weights.bin",
        "tensors": [
            {
                "name": "w",
                "shape": [4, 2],
                "q": {"dtype": "int8", "shape": [4, 2], "offset": offset},
                "scale": {"dtype": "float32", "shape": [1, 2], "offset": 8},
            }
        ],
    }


def test_a_newer_manifest_schema_is_refused_with_advice(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["schema"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelUnavailable, match=r"schema 99 is newer.*upgrade it"):
        Manifest.read(folder)


def test_dequantize_at_load_must_name_a_listed_file_and_stay_inside_it(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["session"] = {"pre_optimized": True, "dequantize_at_load": _dequantize_entry()}
    with pytest.raises(ModelUnavailable, match=r"'weights\.bin', which is not among the files"):
        Manifest.from_dict(data)
    data["files"]["weights.bin"] = {"sha256": "0" * 64, "size": 16}
    manifest = Manifest.from_dict(data)
    assert manifest.dequantize_at_load is not None
    assert manifest.dequantize_at_load.tensors[0].scale.count == 2
    assert manifest.weights_size == data["files"]["model.onnx"]["size"] + 16
    data["session"]["dequantize_at_load"] = _dequantize_entry(offset=12)
    with pytest.raises(ModelUnavailable, match=r"'w' reaches past the end of weights\.bin"):
        Manifest.from_dict(data)
    data["session"]["dequantize_at_load"] = _dequantize_entry() | {"tensors": [{"name": "w"}]}
    with pytest.raises(ModelUnavailable, match="manifest is invalid"):
        Manifest.from_dict(data)
