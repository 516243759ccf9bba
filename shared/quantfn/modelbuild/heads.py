"""Heads appended to an encoder graph: pooling, L2 normalisation, Dense layers and a linear classifier.

A scikit-learn linear model trained on sentence embeddings (LogisticRegression,
LinearSVC, RidgeClassifier...) is ``logits = x @ coef.T + intercept``; appended
after pooling and normalisation it makes one graph from tokens to logits, so
the runtime serves it as a ``classify`` model with no scikit-learn in the layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantfn.modelbuild.errors import BuildError

if TYPE_CHECKING:
    import onnx

LOGITS = "logits"


def _add(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    # np.ascontiguousarray makes a 0-d array 1-d, and a scalar Gather index must stay 0-d (it drops the axis).
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array) if array.ndim else array, name))
    return name


def append_pool(model: onnx.ModelProto, hidden: str, mode: str, normalize: bool) -> str:
    """``hidden`` [B, S, D] pooled over the attention mask as sentence-transformers pools (then L2-normalised);
    returns the [B, D] name. ``mode``: mean, cls, max, mean_sqrt_len_tokens or lasttoken (right padding)."""
    from onnx import TensorProto, helper

    n = model.graph.node

    def node(op: str, inputs: list[str], out: str, **attrs: object) -> str:
        n.append(helper.make_node(op, inputs, [f"pool.{out}"], name=f"pool.{out}", **attrs))
        return f"pool.{out}"

    axis1 = _add(model, "pool.axis1", np.array([1], np.int64))
    mask = node("Unsqueeze", [node("Cast", ["attention_mask"], "mask", to=TensorProto.FLOAT),
                              _add(model, "pool.axis2", np.array([2], np.int64))], "mask3")  # fmt: skip
    count = node("ReduceSum", [mask, axis1], "count", keepdims=0)
    if mode == "cls":
        pooled = node("Gather", [hidden, _add(model, "pool.first", np.array(0, np.int64))], "cls", axis=1)
    elif mode == "max":
        # Padded positions get -1e9 (sentence-transformers' value) so they never win.
        off = node("Mul", [node("Sub", [mask, _add(model, "pool.one", np.array(1, np.float32))], "pad"),
                           _add(model, "pool.big", np.array(1e9, np.float32))], "off")  # fmt: skip
        pooled = node("ReduceMax", [node("Add", [hidden, off], "masked_max")], "max", axes=[1], keepdims=0)
    elif mode == "lasttoken":
        last = node("Sub", [node("ReduceSum", ["attention_mask", axis1], "length", keepdims=1),
                            _add(model, "pool.one_id", np.array(1, np.int64))], "last")  # fmt: skip
        index = node("Expand", [node("Unsqueeze", [last, axis1], "last3"), node("Shape", [hidden], "shape")], "index")
        rows = node("GatherElements", [hidden, node("Slice", [index, _add(model, "pool.zero", np.array([0],
                    np.int64)), axis1, axis1], "index1")], "rows", axis=1)  # fmt: skip
        pooled = node("Squeeze", [rows, axis1], "last_token")
    else:
        summed = node("ReduceSum", [node("Mul", [hidden, mask], "masked"), axis1], "sum", keepdims=0)
        safe = node("Max", [count, _add(model, "pool.tiny", np.array(1e-9, np.float32))], "count_safe")
        pooled = node("Div", [summed, node("Sqrt", [safe], "sqrt_count") if mode == "mean_sqrt_len_tokens" else safe],
                      "mean")  # fmt: skip
    if not normalize:
        return pooled
    # Opset 17: ReduceL2 takes its axes as an attribute (an input only from opset 18).
    norm = node("ReduceL2", [pooled], "norm", axes=[-1], keepdims=1)
    safe_norm = node("Max", [norm, _add(model, "pool.eps", np.array(1e-12, np.float32))], "norm_safe")
    return node("Div", [pooled, safe_norm], "unit")


def append_dense(model: onnx.ModelProto, x: str, weight: np.ndarray, bias: np.ndarray | None, activation: str,
                 name: str) -> str:  # fmt: skip
    """A sentence-transformers Dense module, ``activation(x @ weight.T + bias)``, as MatMul (+ Add) (+ activation):
    the MatMul quantizes like every projection."""
    from onnx import helper

    n = model.graph.node
    out = f"{name}.out"
    n.append(helper.make_node("MatMul", [x, _add(model, f"{name}.weight", weight.T.astype(np.float32))], [out],
                              name=out))  # fmt: skip
    if bias is not None:
        n.append(helper.make_node("Add", [out, _add(model, f"{name}.bias", bias.astype(np.float32))],
                                  [f"{name}.biased"], name=f"{name}.biased"))  # fmt: skip
        out = f"{name}.biased"
    ops = {"Tanh": "Tanh", "ReLU": "Relu", "GELU": "Gelu", "Sigmoid": "Sigmoid"}
    if activation in ops:
        # Gelu is an onnx op from opset 20; below, com.microsoft's has the same (erf) meaning.
        domain = "com.microsoft" if activation == "GELU" else ""
        n.append(helper.make_node(ops[activation], [out], [f"{name}.act"], name=f"{name}.act", domain=domain))
        out = f"{name}.act"
    return out


def set_output(model: onnx.ModelProto, name: str, width: int, output: str | None = None) -> None:
    """Make ``name`` [batch, width] the graph's one output, called ``output`` (default: ``name``)."""
    from onnx import TensorProto, helper

    if output and output != name:
        model.graph.node.append(helper.make_node("Identity", [name], [output], name=output))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(output or name, TensorProto.FLOAT, ["batch", width]))


def append_linear(model: onnx.ModelProto, x: str, coef: np.ndarray, intercept: np.ndarray) -> str:
    """``x @ coef.T + intercept`` as MatMul + Add (the MatMul quantizes like every projection); output ``logits``."""
    from onnx import helper

    n = model.graph.node
    n.append(
        helper.make_node(
            "MatMul", [x, _add(model, "head.weight", coef.T.astype(np.float32))], ["head.scores"], name="head.scores"
        )
    )
    n.append(
        helper.make_node(
            "Add", ["head.scores", _add(model, "head.bias", intercept.astype(np.float32))], [LOGITS], name=LOGITS
        )
    )
    set_output(model, LOGITS, coef.shape[0])
    return LOGITS


def load_sklearn_linear(head: Path, label_map: Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(coef [L, D], intercept [L], labels)`` of a pickled scikit-learn linear classifier.

    Labels are ``classes_`` in logit order, mapped through ``label_map`` (a pickled
    dict class -> name) when given. Binary models (one coefficient row) are refused:
    their two-class softmax would need a second row this build does not invent.
    Only load pickles you trust: joblib runs code from the file.
    """
    try:
        import joblib
    except ImportError as exc:
        raise BuildError("a scikit-learn head needs joblib and scikit-learn at build time") from exc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InconsistentVersionWarning: the arrays are all that is read
        model = joblib.load(head)
        names = joblib.load(label_map) if label_map else None
    coef, intercept = getattr(model, "coef_", None), getattr(model, "intercept_", None)
    classes = getattr(model, "classes_", None)
    if coef is None or intercept is None or classes is None:
        raise BuildError(f"{head.name} holds a {type(model).__name__}, not a linear classifier (no coef_/classes_)")
    coef = np.asarray(coef, dtype=np.float64)
    if coef.ndim != 2 or coef.shape[0] != len(classes):
        raise BuildError(
            f"{head.name}: {len(classes)} classes but coef_ of shape {coef.shape} (binary heads unsupported)"
        )
    labels = [str(names.get(str(c), names.get(c, c))) if names else str(c) for c in classes]
    if len(set(labels)) != len(labels):
        raise BuildError(f"{head.name}: labels are not distinct after the label map")
    return coef, np.broadcast_to(np.asarray(intercept, np.float64), (coef.shape[0],)).copy(), labels
