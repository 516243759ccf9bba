"""The model manifest (schema 4): what a model folder is, how to run it, how to verify it.

A model folder is ``manifest.json`` and exactly the files it lists (``model.onnx``,
``tokenizer.json``, and ``weights.bin`` when the graph was saved pre-optimized
with its big fp32 weights kept int8, ``session.dequantize_at_load``). The runtime
dispatches on the manifest alone; nothing about one checkpoint is in code.

Schema 4, the fields the runtime reads (everything else is kept in ``raw``)::

    schema               4 (3 without a cascade: a folder without one is written as schema 3, which older
                         runtimes read)
    model_id             "all-minilm-l6-v2"            folder name; [A-Za-z0-9._-]
    task                 "embed" | "rerank" | "classify"
    architecture         "bert" | "mpnet" | "onnx" ...  what the build exported (informational)
    files                {name: {"sha256", "size"}}      every file but the manifest
    inputs               ["input_ids", "attention_mask", "token_type_ids"?]   graph inputs, in order
    output               graph output the task reads
    output_kind          "token_embeddings" [B,S,D] | "sentence_embedding" [B,D] | "logits" [B,L]
    pooling              embed: "mean" | "cls" | "max" | "mean_sqrt_len_tokens" | "lasttoken" | "none" (the graph
                         already pooled: output_kind sentence_embedding)
    normalize            embed: L2-normalise the pooled vector
    dimensions           embed: vector size; classify: number of labels; rerank: 1
    max_sequence_length  tokens per input (per pair for rerank) after the tokenizer's own truncation
    labels               classify: label names in logit order
    scoring              classify: "softmax" (single-label) | "sigmoid" (multi-label); rerank: "sigmoid" | "none"
    pair                 true when inputs are (query, document) pairs (cross-encoder rerank)
    tokenizer            {"file": "tokenizer.json", "pad_id", "pad_token", "special_tokens": [...],
                          "pair_template": "..."}   read from tokenizer.json by the build; the runtime
                          uses the tokenizer's own post-processor and truncation, so no token is a literal
    prompts              optional {"query": "query: ", "document": "passage: "} prefixes by input_type
    default_prompt       optional prefix for texts without an input_type (sentence-transformers default_prompt_name)
    matryoshka_dimensions  embed, optional: the shorter sizes the model was trained to serve (a build option);
                          a request may ask for one of them (truncated, then re-normalised)
    embedding_ranges     embed, optional: {"by_dimensions": {"384": {"low": [...], "high": [...]}, ...}, ...}, one
                          range per dimension for each size served, calibrated at build time on the calibration
                          texts; int8/uint8 embeddings scale by them (absent: a model built before them, no int8)
    source               {"kind": "pypi" | "hf-folder" | "onnx", "upstream", "package", "version", ...}
    session              {"pre_optimized", "config", "dequantize_at_load"?}
    cascade              classify, optional: {"file": "fallback.onnx", "margin", "recipe", "session": {...}}: inputs
                         whose logits from model.onnx are within ``margin`` of a different decision (top-1 minus
                         top-2 logit for softmax, the smallest |logit| for sigmoid) are run again by the graph
                         ``file`` (its own ``session`` object, as above) and answered from it
    quantization, fidelity, quality, tools, deploy, size_ratio_vs_fp32   build records (reported, not used)

Schema 1 and 2 folders (the embedder built before schema 3) still load: their
``task: "embedding"`` reads as ``embed``, BERT, mean pooling, pad id 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantfn.errors import IntegrityError, ModelUnavailable

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 4  # 2 added session.dequantize_at_load; 3 added tasks, pooling, labels, pairs, prompts; 4 cascade
CASCADE_SCHEMA = 4
BASE_SCHEMA = 3  # what a build writes for a folder without a cascade (runtimes before schema 4 read it)
TASKS = ("embed", "rerank", "classify")
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken", "none")
OUTPUT_KINDS = ("token_embeddings", "sentence_embedding", "logits")
SCORINGS = ("softmax", "sigmoid", "none")
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
class GraphSession:
    """How one graph file of the folder is opened: ``session`` of the manifest (``model.onnx``) or of a cascade."""

    pre_optimized: bool = False
    config: dict[str, str] = field(default_factory=dict)
    dequantize_at_load: DequantizeAtLoad | None = None

    @classmethod
    def from_dict(cls, session: dict[str, Any], files: dict[str, FileEntry]) -> GraphSession:
        dequantize = session.get("dequantize_at_load")
        return cls(
            pre_optimized=bool(session.get("pre_optimized", False)),
            config={str(k): str(v) for k, v in session.get("config", {}).items()},
            dequantize_at_load=None if dequantize is None else DequantizeAtLoad.from_dict(dequantize, files),
        )


@dataclass(frozen=True)
class Cascade:
    """``cascade``: a second graph that answers the inputs ``model.onnx`` leaves within ``margin`` of another
    decision (a classifier's int8 graph, with its weight-only build for the near ties)."""

    file: str
    margin: float
    session: GraphSession

    @classmethod
    def from_dict(cls, data: dict[str, Any], files: dict[str, FileEntry]) -> Cascade:
        name, margin = str(data["file"]), float(data["margin"])
        if name not in files or name == "model.onnx" or not name.endswith(".onnx"):
            raise ValueError(f"cascade 'file' must name another .onnx graph among the files, not {name!r}")
        if not 0 <= margin < float("inf"):
            raise ValueError(f"cascade 'margin' must be finite and not negative, got {margin!r}")
        return cls(name, margin, GraphSession.from_dict(data.get("session", {}), files))


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
    architecture: str = "bert"
    output_kind: str = "token_embeddings"
    labels: tuple[str, ...] = ()
    scoring: str = "none"
    pair: bool = False
    pad_id: int = 0
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str = ""
    matryoshka_dimensions: tuple[int, ...] = ()
    #: Per served size: (low, high) per dimension, as float32 arrays' tuples (``embedding_ranges``).
    embedding_ranges: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    upstream: str = ""
    schema: int = SCHEMA_VERSION
    session: GraphSession = field(default_factory=GraphSession)
    cascade: Cascade | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @property
    def pre_optimized(self) -> bool:
        return self.session.pre_optimized

    @property
    def session_config(self) -> dict[str, str]:
        return self.session.config

    @property
    def dequantize_at_load(self) -> DequantizeAtLoad | None:
        return self.session.dequantize_at_load

    @property
    def weights_size(self) -> int:
        return weights_size(self.files)

    @property
    def fidelity(self) -> dict[str, Any]:
        return dict(self.raw.get("fidelity", {}))

    @property
    def recipe(self) -> str:
        return str(self.raw.get("quantization", {}).get("recipe", ""))

    @property
    def output_dimensions(self) -> tuple[int, ...]:
        """Every size an embedding of this model may have: its own, then its Matryoshka sizes."""
        return (self.dimensions, *self.matryoshka_dimensions)

    @property
    def multi_label(self) -> bool:
        return self.task == "classify" and self.scoring == "sigmoid"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate and parse; raises ModelUnavailable naming the bad field."""
        try:
            schema = int(data.get("schema", 1))
            if schema > SCHEMA_VERSION:
                raise ValueError(f"schema {schema} is newer than this quantfn reads ({SCHEMA_VERSION}): upgrade it")
            if schema < 1:
                raise ValueError(f"schema {schema} is unknown: rebuild the model with `quantfn build-model`")
            files = {
                name: FileEntry(sha256=str(entry["sha256"]), size=_size(entry["size"]))
                for name, entry in data["files"].items()
            }
            for name in files:
                if "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST_NAME:
                    raise ValueError(f"illegal file name {name!r}")
            for needed in ("model.onnx", "tokenizer.json"):
                if needed not in files:
                    raise ValueError(f"'files' must list {needed}")
            fields = _schema3_fields(data) if schema >= 3 else _schema2_fields(data)
            cascade = data.get("cascade") if schema >= CASCADE_SCHEMA else None
            if cascade is not None and fields["task"] != "classify":
                raise ValueError("'cascade' is for classify models")
            return cls(
                model_id=str(data["model_id"]),
                files=files,
                max_sequence_length=int(data["max_sequence_length"]),
                inputs=tuple(str(name) for name in data["inputs"]),
                output=str(data["output"]),
                schema=schema,
                upstream=str(data.get("source", {}).get("upstream", "")),
                session=GraphSession.from_dict(data.get("session", {}), files),
                cascade=None if cascade is None else Cascade.from_dict(cascade, files),
                raw=data,
                **fields,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
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


def _size(value: Any) -> int:
    size = int(value)  # int(1e400) raises OverflowError, caught as a bad manifest
    if size < 0 or size > 1 << 40:
        raise ValueError(f"file size {value!r} is out of range")
    return size


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = data.get(key, default)
    if value not in choices:
        raise ValueError(f"{key!r} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _schema3_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The task fields of a schema 3 manifest, checked for consistency."""
    task = _choice(data, "task", TASKS)
    output_kind = _choice(data, "output_kind", OUTPUT_KINDS, "logits" if task != "embed" else "token_embeddings")
    labels = tuple(str(label) for label in data.get("labels", ()))
    tokenizer = data.get("tokenizer", {})
    fields: dict[str, Any] = {
        "task": task,
        "architecture": str(data.get("architecture", "bert")),
        "output_kind": output_kind,
        "labels": labels,
        "pair": bool(data.get("pair", False)),
        "pad_id": int(tokenizer.get("pad_id", 0)),
        "prompts": {str(k): str(v) for k, v in data.get("prompts", {}).items()},
        "default_prompt": str(data.get("default_prompt", "")),
    }
    if task == "embed":
        fields["pooling"] = _choice(data, "pooling", POOLINGS, "mean")
        if (fields["pooling"] == "none") != (output_kind == "sentence_embedding"):
            raise ValueError("pooling 'none' goes with output_kind 'sentence_embedding', and only with it")
        fields["normalize"] = bool(data.get("normalize", True))
        fields["dimensions"] = int(data["dimensions"])
        fields.update(_embedding_outputs(data, fields["dimensions"]))
    else:
        if output_kind != "logits":
            raise ValueError(f"a {task} model's output_kind must be 'logits'")
        fields["pooling"], fields["normalize"] = "none", False
        fields["scoring"] = _choice(data, "scoring", SCORINGS, "softmax" if task == "classify" else "sigmoid")
        if task == "classify":
            if not labels or len(set(labels)) != len(labels):
                raise ValueError("a classify model needs 'labels': distinct names in logit order")
            fields["dimensions"] = len(labels)
        else:
            if not fields["pair"]:
                raise ValueError("a rerank model scores (query, document) pairs: 'pair' must be true")
            fields["dimensions"] = 1
    return fields


def _embedding_outputs(data: dict[str, Any], dimensions: int) -> dict[str, Any]:
    """``matryoshka_dimensions`` and ``embedding_ranges`` (both optional), checked against ``dimensions``."""
    sizes = tuple(int(size) for size in data.get("matryoshka_dimensions", ()))
    if any(not 0 < size < dimensions for size in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"'matryoshka_dimensions' must be distinct sizes below {dimensions}")
    ranges = {}
    for key, entry in data.get("embedding_ranges", {}).get("by_dimensions", {}).items():
        size = int(key)
        low, high = tuple(float(v) for v in entry["low"]), tuple(float(v) for v in entry["high"])
        if size not in (dimensions, *sizes) or len(low) != size or len(high) != size:
            raise ValueError(f"'embedding_ranges' for {size} dimensions does not match the model's sizes")
        if not all(lo <= hi for lo, hi in zip(low, high, strict=True)):
            raise ValueError("'embedding_ranges' has a range whose low is above its high")
        ranges[size] = (low, high)
    return {"matryoshka_dimensions": sizes, "embedding_ranges": ranges}


def _schema2_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Schemas 1 and 2 knew one task, the mean-pooled BERT embedder."""
    if data.get("task") != "embedding":
        raise ValueError(f"schema 2 task {data.get('task')!r} is unknown: rebuild the model with `quantfn build-model`")
    return {
        "task": "embed",
        "dimensions": int(data["dimensions"]),
        "pooling": _choice(data, "pooling", ("mean",), "mean"),
        "normalize": bool(data.get("normalize", True)),
    }


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
    for name in manifest.files:
        _check_size(folder, manifest, name)
    for name in manifest.files:
        _check_sha256(folder, manifest, name)


def verify_file(folder: Path, manifest: Manifest, name: str) -> None:
    """Check one file the manifest names, as ``verify_folder`` checks each; IntegrityError if it fails."""
    _check_size(folder, manifest, name)
    _check_sha256(folder, manifest, name)


def _check_size(folder: Path, manifest: Manifest, name: str) -> None:
    path, expected = folder / name, manifest.files[name].size
    if not path.is_file():
        raise IntegrityError(f"model {manifest.model_id} is incomplete: {name} is missing")
    size = path.stat().st_size
    if size != expected:
        raise IntegrityError(
            f"model {manifest.model_id} is incomplete or altered: {name} has {size} bytes, manifest says {expected}"
        )


def _check_sha256(folder: Path, manifest: Manifest, name: str) -> None:
    if sha256_file(folder / name) != manifest.files[name].sha256:
        raise IntegrityError(f"model {manifest.model_id} failed verification: sha256 of {name} does not match")
