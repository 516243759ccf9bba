"""Heads appended to an encoder graph: mean pooling, L2 normalisation and a linear classifier.

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

    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def append_mean_pool(model: onnx.ModelProto, hidden: str, normalize: bool) -> str:
    """Mean of ``hidden`` [B, S, D] over the attention mask (then L2-normalised); returns the [B, D] name."""
    from onnx import TensorProto, helper

    n = model.graph.node
    n.append(helper.make_node("Cast", ["attention_mask"], ["pool.mask"], name="pool.mask", to=TensorProto.FLOAT))
    n.append(
        helper.make_node(
            "Unsqueeze",
            ["pool.mask", _add(model, "pool.axis2", np.array([2], np.int64))],
            ["pool.mask3"],
            name="pool.mask3",
        )
    )
    n.append(helper.make_node("Mul", [hidden, "pool.mask3"], ["pool.masked"], name="pool.masked"))
    axis1 = _add(model, "pool.axis1", np.array([1], np.int64))
    n.append(helper.make_node("ReduceSum", ["pool.masked", axis1], ["pool.sum"], name="pool.sum", keepdims=0))
    n.append(helper.make_node("ReduceSum", ["pool.mask3", axis1], ["pool.count"], name="pool.count", keepdims=0))
    tiny = _add(model, "pool.tiny", np.array(1e-9, np.float32))
    n.append(helper.make_node("Max", ["pool.count", tiny], ["pool.count_safe"], name="pool.count_safe"))
    n.append(helper.make_node("Div", ["pool.sum", "pool.count_safe"], ["pool.mean"], name="pool.mean"))
    if not normalize:
        return "pool.mean"
    # Opset 17: ReduceL2 takes its axes as an attribute (an input only from opset 18).
    n.append(helper.make_node("ReduceL2", ["pool.mean"], ["pool.norm"], name="pool.norm", axes=[-1], keepdims=1))
    eps = _add(model, "pool.eps", np.array(1e-12, np.float32))
    n.append(helper.make_node("Max", ["pool.norm", eps], ["pool.norm_safe"], name="pool.norm_safe"))
    n.append(helper.make_node("Div", ["pool.mean", "pool.norm_safe"], ["pool.unit"], name="pool.unit"))
    return "pool.unit"


def append_linear(model: onnx.ModelProto, x: str, coef: np.ndarray, intercept: np.ndarray) -> str:
    """``x @ coef.T + intercept`` as MatMul + Add (the MatMul quantizes like every projection); output ``logits``."""
    from onnx import TensorProto, helper

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
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", coef.shape[0]]))
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
