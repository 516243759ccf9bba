"""Save an int8 weight-only graph pre-optimized, with its weights still int8 on disk.

onnxruntime turns the default recipe's ``DequantizeLinear`` weights into fp32
constants at every session load (constant folding), then runs the other graph
passes; saving that optimized graph would store the fp32 weights, 4x the size.
Here the build saves the optimized graph without those constants and writes
their int8 source (``q`` and ``scale``) to ``weights.bin``; at load
``quantfn.models.session`` rebuilds each one as ``q * scale`` and hands it to
onnxruntime, which then needs no optimization pass at all.

Every rebuilt tensor is compared bit for bit with what onnxruntime folded; a
constant this module cannot reproduce exactly fails the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantfn.modelbuild.errors import BuildError

WEIGHTS_FILE = "weights.bin"
_ALIGN = 64
STUB_LENGTH = "1"
# Folded constants that are not int8 weights (a torch export's Constant nodes, shape arithmetic) stay in the
# graph below this size; a large one this module cannot rebuild still fails the build.
_INLINE_LIMIT = 1 << 20


def _arrays(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _source(name: str, producers: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)`` such that the folded constant ``name`` should be ``q * scale`` (reshaped).

    Two shapes occur: ``DequantizeLinear(q, scale[, zero point 0])`` per axis, and
    ``Reshape(Mul(Cast(q), scale))`` (the block-scaled position table).
    """
    node = producers.get(name)
    if node is not None and node.op_type == "Reshape":
        node = producers.get(node.input[0])
    if node is None:
        raise BuildError(f"folded constant {name!r} has no producer this build knows how to rebuild")
    if node.op_type == "DequantizeLinear":
        q, scale = arrays[node.input[0]], arrays[node.input[1]]
        if len(node.input) > 2 and node.input[2] and arrays[node.input[2]].any():
            raise BuildError(f"{name!r}: only a zero point of 0 can be rebuilt")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            scale = scale.reshape([-1 if d == axis % q.ndim else 1 for d in range(q.ndim)])
        return q, scale
    if node.op_type == "Mul":
        cast = producers.get(node.input[0])
        if cast is not None and cast.op_type == "Cast" and cast.input[0] in arrays and node.input[1] in arrays:
            return arrays[cast.input[0]], arrays[node.input[1]]
    raise BuildError(f"folded constant {name!r} comes from {node.op_type}, which this build cannot rebuild")


def optimize(path: Path, config: dict[str, str]) -> Path:
    """``path`` as onnxruntime's EXTENDED level optimizes it (with the session ``config``), saved beside it as
    ``optimized.onnx``. EXTENDED applies only hardware-independent fusions (the layout transforms that tie a saved
    graph to one CPU are level ALL), so the file stays portable; the fusions slower on CPU are left out."""
    import onnxruntime as ort

    from quantfn.models.session import SLOW_CPU_FUSIONS

    optimized_path = path.with_name("optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized_path)
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(SLOW_CPU_FUSIONS)
    )
    return optimized_path


def pre_optimize(path: Path, config: dict[str, str], weights_file: str = WEIGHTS_FILE) -> dict[str, Any]:
    """Rewrite ``path`` optimized (``optimize``) and write its int8 weights beside it (``weights_file``).

    Returns the manifest's ``session.dequantize_at_load`` object.
    """
    import onnx

    optimized_path = optimize(path, config)
    source = onnx.load(str(path))
    optimized = onnx.load(str(optimized_path))
    optimized_path.unlink()
    arrays = _arrays(source.graph)
    producers = {output: node for node in source.graph.node for output in node.output}
    blobs: list[bytes] = []
    offset = 0

    def store(array: np.ndarray) -> dict[str, Any]:
        nonlocal offset
        padding = -offset % _ALIGN
        blobs.append(b"\0" * padding)
        record = {"dtype": str(array.dtype), "shape": list(array.shape), "offset": offset + padding}
        blobs.append(np.ascontiguousarray(array).tobytes())
        offset += padding + array.nbytes
        return record

    tensors = []
    for init in optimized.graph.initializer:
        if init.name in arrays:
            continue  # an initializer of the source graph, kept as it was
        folded = onnx.numpy_helper.to_array(init)
        try:
            q, scale = _source(init.name, producers, arrays)
        except BuildError:
            if folded.nbytes > _INLINE_LIMIT:
                raise
            continue  # a small folded constant (shapes, masks of a torch export): stays inline, as saved

        rebuilt = np.multiply(q, scale, dtype=np.float32).reshape(folded.shape)
        if folded.dtype != np.float32 or not np.array_equal(rebuilt, folded):
            raise BuildError(f"folded constant {init.name!r} is not exactly q * scale; cannot keep it int8")
        tensors.append({"name": init.name, "shape": list(folded.shape), "q": store(q), "scale": store(scale)})
        # Keep the declaration (name, type, shape) with an external-data stub: onnxruntime
        # takes the values from SessionOptions.add_initializer. The stub's length (1 byte) is not
        # the tensor's, so plain onnxruntime refuses the file ("external data size mismatch")
        # instead of reading weights.bin's int8 bytes as fp32 (length 0 meant "the tensor's size":
        # it loaded and returned NaN). `quantfn export` writes the standalone model.
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in (("location", weights_file), ("offset", "0"), ("length", STUB_LENGTH)):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        init.doc_string = f"quantfn: int8 in {weights_file}, dequantized at load (manifest session.dequantize_at_load)"
    if not tensors:
        raise BuildError("nothing to dequantize at load: the graph has no folded int8 weights")
    (path.parent / weights_file).write_bytes(b"".join(blobs))
    onnx.save_model(optimized, str(path))
    return {"file": weights_file, "tensors": tensors}


__all__ = ["WEIGHTS_FILE", "optimize", "pre_optimize"]
