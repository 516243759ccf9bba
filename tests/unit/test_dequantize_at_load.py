"""A graph saved without its fp32 weights gets them rebuilt from int8 at load, by real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantfn.errors import IntegrityError
from quantfn.models.manifest import ArraySlice, DequantizeAtLoad, DequantizedTensor
from quantfn.models.session import create_session


def _model_with_a_stubbed_weight(folder: Path) -> None:
    """y = x @ w, where w (4 x 2 fp32) is declared in the graph but its data is an empty external stub."""
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 2])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "0")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(folder / "model.onnx"))


def _spec() -> DequantizeAtLoad:
    q = ArraySlice("int8", (4, 2), 0)
    scale = ArraySlice("float32", (1, 2), 8)
    return DequantizeAtLoad("weights.bin", (DequantizedTensor("w", (4, 2), q, scale),))


def test_weights_are_rebuilt_as_q_times_scale(tmp_path: Path) -> None:
    q = np.array([[1, -2], [3, 4], [-5, 6], [7, -128]], dtype=np.int8)
    scale = np.array([[0.5, 0.25]], dtype=np.float32)
    (tmp_path / "weights.bin").write_bytes(q.tobytes() + scale.tobytes())
    _model_with_a_stubbed_weight(tmp_path)
    session = create_session(tmp_path / "model.onnx", threads=1, pre_optimized=True, dequantize=_spec())
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, x @ (q.astype(np.float32) * scale))


def test_a_short_weights_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x01" * 10)
    _model_with_a_stubbed_weight(tmp_path)
    with pytest.raises(IntegrityError, match=r"weights\.bin does not hold tensor 'w'"):
        create_session(tmp_path / "model.onnx", threads=1, pre_optimized=True, dequantize=_spec())
