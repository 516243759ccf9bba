"""``quantfn export``: a model folder as one standalone ONNX file that plain onnxruntime runs.

A folder built with ``session.dequantize_at_load`` keeps its big weights int8 in
``weights.bin``; its ``model.onnx`` declares them with a stub that plain
onnxruntime refuses. Here they are rebuilt exactly as ``quantfn.models.session``
rebuilds them (``q * scale``) and written into the graph as fp32 initializers:
the file is about 4x larger and loads anywhere with onnxruntime's contrib ops.
Folders without a weights file are copied as they are (their model.onnx is complete).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from quantfn.modelbuild.errors import BuildError


def write_standalone(folder: Path, out: Path) -> Path:
    """Write ``out`` (.onnx) from the built model ``folder``; BuildError when the folder is not a model."""
    import onnx
    from onnx import numpy_helper

    from quantfn.errors import QuantfnError
    from quantfn.models.manifest import Manifest, verify_folder
    from quantfn.models.session import dequantized_weights

    try:
        manifest = Manifest.read(folder)
        verify_folder(folder, manifest)
    except QuantfnError as exc:
        raise BuildError(f"{folder} is not a verified model folder: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    if manifest.dequantize_at_load is None:
        shutil.copyfile(folder / "model.onnx", out)
        return out
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    arrays = dict(dequantized_weights(folder, manifest.dequantize_at_load))
    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays.pop(init.name), init.name))
    if arrays:
        raise BuildError(f"weights {sorted(arrays)[:3]} are not declared by {folder / 'model.onnx'}")
    onnx.save_model(model, str(out))
    return out
