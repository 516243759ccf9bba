"""Static activation scales (``int8-static``) on a one-projection graph: LayerNorm -> MatMul -> bias Add."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantfn.modelbuild.quantize import normalized_projections, per_token_int8

K, N = 64, 48


def _graph(weight: np.ndarray, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(beta, "beta"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1, epsilon=1e-12),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="proj"),
        helper.make_node("Add", ["y", "b"], ["out"], name="proj.biased"),
        helper.make_node("Gelu", ["out"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "W2"], ["z"], name="after_gelu"),
    ]
    inits.append(numpy_helper.from_array(np.eye(N, dtype=np.float32), "W2"))
    graph = helper.make_graph(
        nodes,
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", N])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * gamma + beta


def test_a_projection_after_layernorm_gets_one_calibrated_scale_and_its_bias_inside_the_kernel() -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    gamma = (1 + rng.random(K) * 3).astype(np.float32)  # uneven channels, as a trained LayerNorm has
    gamma[3] = 12.0
    beta = (rng.standard_normal(K) * 0.3).astype(np.float32)
    model = _graph(weight, bias, gamma, beta)
    assert normalized_projections(model) == ["proj"]  # the one after GELU keeps per-token scales

    calibration = _layer_norm(rng.standard_normal((400, K)), gamma, beta)
    hessians = {"h": calibration.T @ calibration}
    ranges = {"h": (calibration.min(axis=0), calibration.max(axis=0))}
    per_token_int8(model, hessians=hessians | {"g": np.eye(N)}, weight_max=63, static=["proj"], ranges=ranges)

    names = [n.name for n in model.graph.node]
    assert "proj.biased" not in names  # the bias (and the centre's c W) went into MatMulIntegerToFloat
    (kernel, _) = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert kernel.input[6] == "W.st.bias" and kernel.output[0] == "out"
    static = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name.startswith("W."))
    scales = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert scales[static.input[1]].size == 1 and static.input[1] == kernel.input[2]
    # centred and smoothed by a second LayerNormalization (its scale and bias adjusted), not a Mul and an Add
    producer = next(n for n in model.graph.node if static.input[0] in n.output)
    assert producer.op_type == "LayerNormalization" and producer.input[0] == "x" and producer.name != "ln"

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((32, K)).astype(np.float32)  # held-out tokens of the same kind
    (got,) = session.run(["out"], {"x": x})
    want = _layer_norm(x.astype(np.float64), gamma, beta) @ weight + bias
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.999  # a bias scaled by the activation scale would be far off
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()

    # batch invariant: a token's numbers do not depend on the other rows, even a wild one
    wild = np.concatenate([x[:1], 50 * rng.standard_normal((1, K)).astype(np.float32)])
    (alone,) = session.run(["out"], {"x": x[:1]})
    (beside,) = session.run(["out"], {"x": wild})
    np.testing.assert_array_equal(alone[0], beside[0])


def test_an_input_after_gelu_is_quantized_above_gelus_floor_with_every_code() -> None:
    """Per token, ``g - floor >= 0``: codes 0..255 (zero point 0, no Abs), and ``floor * colsum(W)`` back on."""
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    model = _graph(weight, np.zeros(N, np.float32), np.ones(K, np.float32), np.zeros(K, np.float32))
    w2 = (rng.standard_normal((N, N)) / np.sqrt(N)).astype(np.float32)
    next(t for t in model.graph.initializer if t.name == "W2").CopyFrom(numpy_helper.from_array(w2, "W2"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", N]))
    x = rng.standard_normal((400, K)).astype(np.float32)
    h = _layer_norm(x.astype(np.float64), 1, 0)
    g = (h @ weight) * 0.5 * (1 + np.vectorize(math.erf)(h @ weight / np.sqrt(2)))
    per_token_int8(model, hessians={"h": h.T @ h, "g": g.T @ g}, weight_max=63)

    assert not [n for n in model.graph.node if n.op_type == "Abs" and n.name.startswith("W2")]
    floored = next(n for n in model.graph.node if n.name == "W2.ft.q")
    assert len(floored.input) == 2  # no zero point: uint8 codes from 0
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (z,) = session.run(["z"], {"x": x[:64]})
    want = g[:64] @ w2
    cosine = (z * want).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.999  # a missing floor * colsum(W) would shift every output
