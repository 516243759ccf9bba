"""The model manifest: what a model folder holds and how to verify it.

A model folder has ``model.onnx``, ``tokenizer.json`` and ``manifest.json``, and
``weights.bin`` when the graph was saved pre-optimized with its fp32 weights
kept as int8 (``session.dequantize_at_load``). The manifest records the sha256
and size of every other file, so a store can refuse a tampered or incomplete
copy before any byte reaches onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantfn.errors import IntegrityError, ModelUnavailable

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 2  # 2 added session.dequantize_at_load
_CHUNK = 1 << 20
_ITEMSIZE = {"int8": 1, "uint8": 1, "float32": 4}  # the array dtypes a weights file may hold


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class ArraySlice:
    """A C-ordered array stored at ``offset`` bytes into the weights file."""

    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def count(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArraySlice:
        dtype, shape, offset = str(data["dtype"]), tuple(int(d) for d in data["shape"]), int(data["offset"])
        if dtype not in _ITEMSIZE:
            raise ValueError(f"array dtype {dtype!r} is not one of {sorted(_ITEMSIZE)}")
        if offset < 0 or any(d < 0 for d in shape):
            raise ValueError("array offset and dimensions must not be negative")
        return cls(dtype, shape, offset)


@dataclass(frozen=True)
class DequantizedTensor:
    """One fp32 initializer of the graph, rebuilt at load as ``(q * scale).reshape(shape)``."""

    name: str
    shape: tuple[int, ...]
    q: ArraySlice
    scale: ArraySlice


@dataclass(frozen=True)
class DequantizeAtLoad:
    """``session.dequantize_at_load``: the int8 weights file and the fp32 tensors made from it."""

    file: str
    tensors: tuple[DequantizedTensor, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any], files: dict[str, FileEntry]) -> DequantizeAtLoad:
        name = str(data["file"])
        if name not in files:
            raise ValueError(f"dequantize_at_load names {name!r}, which is not among the files")
        size = files[name].size
        tensors = []
        for entry in data["tensors"]:
            tensor = DequantizedTensor(
                name=str(entry["name"]),
                shape=tuple(int(d) for d in entry["shape"]),
                q=ArraySlice.from_dict(entry["q"]),
                scale=ArraySlice.from_dict(entry["scale"]),
            )
            for part in (tensor.q, tensor.scale):
                if part.offset + part.count * _ITEMSIZE[part.dtype] > size:
                    raise ValueError(f"tensor {tensor.name!r} reaches past the end of {name}")
            tensors.append(tensor)
        return cls(name, tuple(tensors))


@dataclass(frozen=True)
class Manifest:
    """Parsed ``manifest.json``. ``raw`` keeps every field, known or not."""

    model_id: str
    task: str
    files: dict[str, FileEntry]
    dimensions: int
    max_sequence_length: int
    inputs: tuple[str, ...]
    output: str
    pooling: str = "mean"
    normalize: bool = True
    pre_optimized: bool = False
    session_config: dict[str, str] = field(default_factory=dict)
    dequantize_at_load: DequantizeAtLoad | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @property
    def weights_size(self) -> int:
        return weights_size(self.files)

    @property
    def fidelity(self) -> dict[str, Any]:
        return dict(self.raw.get("fidelity", {}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate and parse; raises ModelUnavailable naming the bad field."""
        try:
            schema = int(data.get("schema", 1))
            if schema > SCHEMA_VERSION:
                raise ValueError(f"schema {schema} is newer than this quantfn reads ({SCHEMA_VERSION}): upgrade it")
            files = {
                name: FileEntry(sha256=str(entry["sha256"]), size=int(entry["size"]))
                for name, entry in data["files"].items()
            }
            for name in files:
                if "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST_NAME:
                    raise ValueError(f"illegal file name {name!r}")
            session = data.get("session", {})
            dequantize = session.get("dequantize_at_load")
            return cls(
                model_id=str(data["model_id"]),
                task=str(data["task"]),
                files=files,
                dimensions=int(data["dimensions"]),
                max_sequence_length=int(data["max_sequence_length"]),
                inputs=tuple(str(name) for name in data["inputs"]),
                output=str(data["output"]),
                pooling=str(data.get("pooling", "mean")),
                normalize=bool(data.get("normalize", True)),
                pre_optimized=bool(session.get("pre_optimized", False)),
                session_config={str(k): str(v) for k, v in session.get("config", {}).items()},
                dequantize_at_load=None if dequantize is None else DequantizeAtLoad.from_dict(dequantize, files),
                raw=data,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelUnavailable(f"model manifest is invalid: {exc}") from exc

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelUnavailable(f"model folder has no {MANIFEST_NAME}") from exc
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"{MANIFEST_NAME} cannot be read: {exc.__class__.__name__}") from exc
        if not isinstance(data, dict):
            raise ModelUnavailable(f"{MANIFEST_NAME} is not a JSON object")
        return cls.from_dict(data)


def weights_size(files: dict[str, FileEntry]) -> int:
    """Bytes of the model proper: every file but the tokenizer."""
    return sum(entry.size for name, entry in files.items() if name != "tokenizer.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    """The manifest entry for one file: ``{"sha256": ..., "size": ...}``."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def verify_folder(folder: Path, manifest: Manifest) -> None:
    """Check every file the manifest names: present, right size, right sha256.

    Raises IntegrityError naming the first file that fails. Sizes are checked
    before hashes so an incomplete copy fails fast.
    """
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"model {manifest.model_id} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(
                f"model {manifest.model_id} is incomplete or altered: {name} has {size} bytes, "
                f"manifest says {entry.size}"
            )
    for name, entry in manifest.files.items():
        if sha256_file(folder / name) != entry.sha256:
            raise IntegrityError(f"model {manifest.model_id} failed verification: sha256 of {name} does not match")
