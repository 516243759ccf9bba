"""Graph rewrites that quantize the fp32 encoder.

Each function takes an fp32 ``onnx.ModelProto`` built by ``export`` and returns
it rewritten in place. Projections are the ``MatMul`` nodes whose second input
is a constant ``[K, N]`` weight; the word-embedding table is the ``Gather`` on
``export.WORD_EMBEDDINGS``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from quantfn.modelbuild.export import WORD_EMBEDDINGS

if TYPE_CHECKING:
    import onnx


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def projection_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul nodes with a constant weight, in graph order."""
    inits = _initializers(model)
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _replace(model: onnx.ModelProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Put ``new`` where the node named like ``old`` is (protobuf copies on extend, so match by name)."""
    nodes = [n for n in model.graph.node]
    at = next(i for i, n in enumerate(nodes) if n.name == old.name)
    copies = [type(n)() for n in new]
    for copy, n in zip(copies, new, strict=True):
        copy.CopyFrom(n)
    nodes[at : at + 1] = copies
    kept = [type(n)() for n in nodes]
    for copy, n in zip(kept, nodes, strict=True):
        copy.CopyFrom(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _pop_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    inits = list(model.graph.initializer)
    tensor = next(t for t in inits if t.name == name)
    model.graph.initializer.remove(tensor)
    return numpy_helper.to_array(tensor)


def _add(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


# Ops whose ``axes`` moved from an attribute to an input at opset 18 (ReduceSum moved at 13).
_AXES_INPUT_AT_18 = {
    "ReduceMax",
    "ReduceMin",
    "ReduceMean",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}
BLOCKED_QUANTIZE_OPSET = 21


def raise_default_opset(model: onnx.ModelProto, version: int = BLOCKED_QUANTIZE_OPSET) -> bool:
    """Move the graph's default-domain opset to ``version`` (>= 18) where that is a mechanical change.

    Between opsets 13 and 21 the only ops that change meaning for graphs like ours are the
    reductions, whose ``axes`` become an input at 18; GroupNormalization (21) changes semantics and
    subgraphs (If/Loop/Scan) would need the same walk, so graphs with either, or below opset 13, are
    left as they are and ``False`` returned.
    """
    from onnx import AttributeProto

    entry = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if entry is None or entry.version < 13:
        return False
    if entry.version >= version:
        return True
    for node in model.graph.node:
        if node.op_type == "GroupNormalization" or any(
            a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute
        ):
            return False
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in _AXES_INPUT_AT_18:
            axes = [a for a in node.attribute if a.name == "axes"]
            if axes:
                name = _add(model, f"{node.name or node.output[0]}.axes", np.array(axes[0].ints, np.int64))
                node.attribute.remove(axes[0])
                del node.input[1:]
                node.input.append(name)
    entry.version = version
    if model.ir_version < 10:  # opset 21 needs IR 10
        model.ir_version = 10
    return True


def unfuse_bias_gelu(model: onnx.ModelProto) -> int:
    """Replace com.microsoft ``BiasGelu`` with ``Add`` + opset-20 ``Gelu`` (exact erf form); returns the count.

    onnxruntime 1.31.1's CPU ``BiasGelu`` is slower than the two ops it fuses: 0.884 against 0.684 ms
    at 1 thread, 0.465 against 0.364 at 2 ([32, 25, 1536], same numbers), so graphs at opset >= 20 keep
    them apart and sessions load with ``BiasGeluFusion`` disabled (``SLOW_CPU_FUSIONS``).
    """
    from onnx import helper

    count = 0
    for node in [n for n in model.graph.node if n.op_type == "BiasGelu" and n.domain == "com.microsoft"]:
        x, bias = node.input
        _replace(
            model,
            node,
            [
                helper.make_node("Add", [x, bias], [node.name + ".biased"], name=node.name + ".bias"),
                helper.make_node("Gelu", [node.name + ".biased"], list(node.output), name=node.name),
            ],
        )
        count += 1
    return count


def _token_shapes(model: onnx.ModelProto) -> dict[str, tuple[str | int, ...]]:
    """Each value's shape without its last axis, where shape inference knows every dim (symbolic or not).

    onnxruntime's symbolic inference, which knows its contrib ops (MultiHeadAttention, BiasGelu): onnx's
    own stops at the first of them. A graph neither can read gets ``{}`` and so shares nothing.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # needs sympy (the build extra)

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # any failure only means no sharing: each input gets its own zero point
        return {}
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = info.type.tensor_type.shape.dim
        leading = tuple(d.dim_param or d.dim_value for d in dims[:-1])
        if dims and all(leading):
            shapes[info.name] = leading
    return shapes


def _replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def _fold_into_values(
    model: onnx.ModelProto, x: str, factor: np.ndarray, weight_scales: dict[str, str], shift: np.ndarray | None = None
) -> bool:
    """Make the attention context ``x`` into ``(x - shift) * factor`` per channel upstream, in its value projection.

    ``x`` is the output of a ``MultiHeadAttention`` whose values are the last third of a ``Split`` of
    a quantized projection (the BERT writer's packed QKV). The context's channel ``j`` is a convex
    combination of value channel ``j``, so multiplying value column ``j`` (its per-column weight scale
    and its bias) by ``factor[j]`` multiplies the context's channel ``j`` by it exactly: the
    SmoothQuant division of the output projection's input costs no pass over the activations. The weights
    of a convex combination sum to 1, so ``shift`` comes off the value bias just as exactly.
    Returns ``False`` (nothing changed) for any other shape of graph.
    """
    from onnx import numpy_helper

    inits = _initializers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    uses = Counter(i for n in model.graph.node for i in n.input)
    attention = producer.get(x)
    if (
        attention is None
        or (attention.op_type, attention.domain) != ("MultiHeadAttention", "com.microsoft")
        or len(attention.input) < 3
        or uses[x] != 1
    ):
        return False
    split = producer.get(attention.input[2])
    if (
        split is None
        or split.op_type != "Split"
        or len(split.output) != 3
        or split.output[2] != attention.input[2]
        or uses[split.output[2]] != 1
        or split.input[0] not in weight_scales
        or len(split.input) < 2
        or split.input[1] not in inits
    ):
        return False
    # The packed bias: the attention's own input, or inside the quantized qkv kernel (_quantize_static moves it)
    kernel = producer.get(split.input[0])
    if len(attention.input) > 3 and attention.input[3]:
        bias_name = attention.input[3]
    elif kernel is not None and kernel.op_type == "MatMulIntegerToFloat" and len(kernel.input) > 6:
        bias_name = kernel.input[6]
    else:
        return False
    if bias_name not in inits or uses[bias_name] != 1:
        return False
    sizes = numpy_helper.to_array(inits[split.input[1]]).astype(int).tolist()
    scale_name = weight_scales[split.input[0]]
    scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
    bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
    start = sizes[0] + sizes[1]
    if sizes[2] != factor.size or scale.shape != (sum(sizes),) or bias.shape != scale.shape:
        return False
    scale[start:] *= factor
    bias[start:] = (bias[start:] - (0 if shift is None else shift)) * factor
    _replace_initializer(model, scale_name, scale.astype(np.float32))
    _replace_initializer(model, bias_name, bias.astype(np.float32))
    return True


def _dequantize_columns(model: onnx.ModelProto, name: str, q: np.ndarray, scale: np.ndarray) -> onnx.NodeProto:
    """A DequantizeLinear of int8 weight ``q`` [K, N] with one symmetric scale per column, output ``<name>.dq``."""
    from onnx import helper

    inputs = [
        _add(model, name + ".q", q),
        _add(model, name + ".scale", scale),
        _add(model, name + ".zp", np.zeros_like(scale, dtype=np.int8)),
    ]
    return helper.make_node("DequantizeLinear", inputs, [name + ".dq"], name=name + ".dq", axis=1)


def quantize_rows_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along ``axis`` (the kept axis)."""
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=reduce, keepdims=True)
    scale = np.maximum(amax, 1e-12) / 127.0
    q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1).astype(np.float32)


def keep_embedding_rows(model: onnx.ModelProto, keep: np.ndarray) -> None:
    """Keep only rows ``keep`` of the fp32 word-embedding table (see ``vocab``)."""
    table = _pop_weight(model, WORD_EMBEDDINGS)
    _add(model, WORD_EMBEDDINGS, table[keep])


def embedding_int8(model: onnx.ModelProto) -> None:
    """Word-embedding table to int8 with one scale per row: Gather(int8) * Gather(scale).

    Dequantizing after the gather touches only the looked-up rows, never the
    47 MB fp32 table.
    """
    from onnx import TensorProto, helper

    node = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == WORD_EMBEDDINGS)
    q, scale = quantize_rows_int8(_pop_weight(model, WORD_EMBEDDINGS), axis=0)
    out = node.output[0]
    ids = node.input[1]
    _replace(
        model,
        node,
        [
            helper.make_node("Gather", [_add(model, WORD_EMBEDDINGS + ".q", q), ids], [out + ".q"], name=out + ".q"),
            helper.make_node(
                "Gather", [_add(model, WORD_EMBEDDINGS + ".scale", scale[:, None]), ids], [out + ".s"], name=out + ".s"
            ),
            helper.make_node("Cast", [out + ".q"], [out + ".f"], name=out + ".f", to=TensorProto.FLOAT),
            helper.make_node("Mul", [out + ".f", out + ".s"], [out], name=out),
        ],
    )


def per_token_int8(
    model: onnx.ModelProto,
    skip: Iterable[str] = (),
    hessians: dict[str, np.ndarray] | None = None,
    alpha: float = 0.5,
    weight_max: int = 127,
    activation_max: int = 127,
    activation_zero: int = 128,
    unsigned_weights: bool = False,
    static: Iterable[str] = (),
    ranges: Ranges | None = None,
    static_alpha: float | None = None,
) -> None:
    """W8A8 with one dynamic activation scale per token and one weight scale per channel.

    Each token's scale depends only on that token's own activations, so a text
    gets the same numbers alone or inside any batch (per-tensor dynamic scales
    do not: one long outlier text changes every other text's rounding).
    ``x -> q = round(x * 127 / max|x_row|) + 128 (uint8) -> MatMulInteger(q, W_int8)
    -> float * (max|x_row| / 127) * w_scale``.

    With ``hessians`` (calibration ``X^T X``), SmoothQuant-style migration: the
    activation is divided per input channel by ``s = rms(x)^alpha / max|W_row|^(1-alpha)``
    and the weight rows multiplied by it, so outlier channels no longer set every
    token's scale; weights are then GPTQ-rounded.

    CPUs without VNNI run onnxruntime's u8 x s8 kernel on ``vpmaddubsw``, which
    saturates each pair of products at 16 bits (``255 * 127 * 2 > 32767``):
    ``weight_max=63`` (7-bit weights) or ``activation_max=63, activation_zero=64``
    (uint8 codes <= 127) keep every pair in range; ``unsigned_weights`` stores
    the weights as uint8 with zero point 128 (onnxruntime's u8 x u8 kernel,
    which widens to 16 bits and never saturates).

    Projections named in ``static`` (``normalized_projections``) take one *static* activation scale
    and zero point instead, from ``ranges`` (the calibration's per-channel extremes of the input,
    divided by the SmoothQuant factor: the whole range seen, nothing clipped), uint8 codes
    ``0 .. 2 * activation_zero - 1``: ``x -> QuantizeLinear(x, s, z) -> MatMulIntegerToFloat(.., s, w_scale,
    z, bias)``. No per-token ops, and the bias rides in the kernel (exact with a scalar ``a_scale``). Still
    batch invariant: a constant scale depends on no other text. Their channels are centred on the calibration
    mid-range and smoothed by half-width (``static_alpha``, else ``alpha``), see ``_quantize_static``.

    An input the op before it bounds from below (a GELU's, ``_FLOORS``) is quantized per token above that
    floor with every uint8 code (``_quantize_floored``), not symmetrically.
    """
    from onnx import helper

    skip, static = set(skip), set(static)
    if static and (hessians is None or ranges is None):
        raise ValueError("static activation scales need the calibration's hessians and ranges")
    _ensure_ms_opset(model)
    # Opset 21's blocked QuantizeLinear takes the per-token scale itself (one block per row): no
    # separate multiply by 127 / max|x| over the activations, no reciprocal.
    token_shapes = _token_shapes(model)
    blocked = raise_default_opset(model)
    if blocked:
        unfuse_bias_gelu(model)
    one = _add(model, "pt.one", np.array(1.0, np.float32))
    zp = _add(model, "pt.zp", np.array(activation_zero, np.uint8))
    w_zp = _add(model, "pt.wzp", np.array(128, np.uint8)) if unsigned_weights else None
    tiny = _add(model, "pt.tiny", np.array(1e-8, np.float32))
    q127 = _add(model, "pt.127", np.array(float(activation_max), np.float32))
    reduce_axes = _add(model, "pt.last_axis", np.array([-1], np.int64)) if blocked else None
    whole_row = np.iinfo(np.int32).max  # a block longer than any row: one scale per row
    quantized_inputs: dict[str, tuple[str, str]] = {}
    weight_scales: dict[str, str] = {}  # projection output -> its per-column weight-scale initializer
    # The blocked zero point must have the scale's shape [.., tokens, 1]: one Shape + Expand serves every
    # activation with the same token axes (all of an encoder's), not one pair per quantized input.
    zero_points: dict[tuple[str | int, ...], str] = {}
    for node in projection_nodes(model):
        if node.name in skip:
            continue
        x, name, y = node.input[0], node.input[1], node.output[0]
        weight = _pop_weight(model, name).astype(np.float64)
        smooth = None
        if hessians is not None:
            h = hessians[x]
            rms = np.sqrt(np.maximum(np.diag(h) / max(h.shape[0], 1), 1e-12))
            spread = rms
            if node.name in static:
                assert ranges is not None
                spread = np.maximum((ranges[x][1] - ranges[x][0]) / 2, 1e-6)
            strength = static_alpha if static_alpha is not None and node.name in static else alpha
            smooth = spread**strength / np.maximum(np.abs(weight).max(axis=1), 1e-8) ** (1 - strength)
            smooth /= np.exp(np.log(smooth).mean())
            w_q, w_scale = gptq_int8(weight * smooth[:, None], h / np.outer(smooth, smooth), qmax=weight_max)
        else:
            w_q, w_scale = quantize_rows_int8(weight, axis=1)
        if unsigned_weights:
            w_q = (w_q.astype(np.int16) + 128).astype(np.uint8)
        weight_scales[y] = _add(model, name + ".scale", np.asarray(w_scale, np.float32).reshape(-1))
        if node.name in static:
            assert smooth is not None and ranges is not None
            low, high = ranges[x]
            _quantize_static(model, node, smooth, low, high, w_q, weight_scales, 2 * activation_zero - 1, w_zp)
            continue
        floor = _floor_of(model, x)
        if floor is not None:
            _quantize_floored(model, node, floor, smooth, w_q, weight_scales[y], 2 * activation_zero - 1, w_zp, blocked)
            continue
        prefix: list[onnx.NodeProto] = []
        key = x if smooth is None else name
        if key not in quantized_inputs:
            p = (x if smooth is None else name) + ".pt"
            if smooth is not None and not _fold_into_values(model, x, 1 / smooth, weight_scales):
                prefix.append(
                    helper.make_node(
                        "Mul",
                        [x, _add(model, p + ".smooth", (1 / smooth).astype(np.float32))],
                        [p + ".in"],
                        name=p + ".in",
                    )
                )
                x = p + ".in"
            prefix += [
                helper.make_node("Abs", [x], [p + ".abs"], name=p + ".abs"),
                helper.make_node(
                    "ReduceMax",
                    [p + ".abs", *([reduce_axes] if reduce_axes else [])],
                    [p + ".amax"],
                    name=p + ".amax",
                    keepdims=1,
                    **({} if blocked else {"axes": [-1]}),
                ),
                helper.make_node("Max", [p + ".amax", tiny], [p + ".range"], name=p + ".range"),
                helper.make_node("Div", [p + ".range", q127], [p + ".scale"], name=p + ".scale"),
            ]
            if blocked:
                token_shape = token_shapes.get(node.input[0])
                row_zp = zero_points.get(token_shape) if token_shape else None
                if row_zp is None:
                    row_zp = p + ".zp"
                    prefix += [
                        helper.make_node("Shape", [p + ".scale"], [p + ".shape"], name=p + ".shape"),
                        helper.make_node("Expand", [zp, p + ".shape"], [row_zp], name=row_zp),
                    ]
                    if token_shape:
                        zero_points[token_shape] = row_zp
                prefix += [
                    helper.make_node(
                        "QuantizeLinear",
                        [x, p + ".scale", row_zp],
                        [p + ".q"],
                        name=p + ".q",
                        axis=-1,
                        block_size=whole_row,
                    ),
                ]
            else:
                prefix += [
                    helper.make_node("Div", [q127, p + ".range"], [p + ".inv"], name=p + ".inv"),
                    helper.make_node("Mul", [x, p + ".inv"], [p + ".scaled"], name=p + ".scaled"),
                    helper.make_node("QuantizeLinear", [p + ".scaled", one, zp], [p + ".q"], name=p + ".q"),
                ]
            quantized_inputs[key] = (p + ".q", p + ".scale")
        xq, x_scale = quantized_inputs[key]
        # One fused kernel for the int32 product, its conversion and the weight scales (onnxruntime's
        # MatMulIntegerToFloat, per-column b_scale; bit-identical to MatMulInteger + Cast + Mul and
        # two passes over the output fewer); the per-token scale follows as one Mul (given to the
        # kernel as a_scale, it is applied by a single-threaded broadcast: slower at 2 threads).
        body = [
            helper.make_node(
                "MatMulIntegerToFloat",
                [xq, _add(model, name + ".q", w_q), one, weight_scales[y], zp, *([w_zp] if w_zp else [])],
                [y + ".w"],
                name=y + ".w",
                domain="com.microsoft",
            ),
            helper.make_node("Mul", [y + ".w", x_scale], [y], name=y),
        ]
        _replace(model, node, prefix + body)
    used = {i for n in model.graph.node for i in n.input}
    for unused in [t for t in model.graph.initializer if t.name.startswith("pt.") and t.name not in used]:
        model.graph.initializer.remove(unused)  # the shared per-token constants, where no input is per token


Ranges = dict[str, tuple[np.ndarray, np.ndarray]]

# The least value an activation can take: GELU's minimum is -0.16997 (erf form; the tanh form's is within
# 1e-4 of it), ReLU's 0. A per-token scale over ``x - floor`` (never negative) spends every uint8 code on
# the values the input can take, where a symmetric scale spends half of them on negatives it never has.
GELU_FLOOR = -0.1701
_FLOORS = {
    ("Gelu", ""): GELU_FLOOR,
    ("Gelu", "com.microsoft"): GELU_FLOOR,
    ("FastGelu", "com.microsoft"): GELU_FLOOR,
    ("BiasGelu", "com.microsoft"): GELU_FLOOR,
    ("Relu", ""): 0.0,
}


def _floor_of(model: onnx.ModelProto, x: str) -> float | None:
    """The least value ``x`` can take where the op producing it bounds it from below (``_FLOORS``), else None."""
    producer = next((n for n in model.graph.node if x in n.output), None)
    return None if producer is None else _FLOORS.get((producer.op_type, producer.domain))


def _quantize_floored(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    floor: float,
    smooth: np.ndarray | None,
    w_q: np.ndarray,
    w_scale: str,
    levels: int,
    w_zp: str | None,
    blocked: bool,
) -> None:
    """Per-token uint8 codes ``0 .. levels`` of ``(x - floor) / smooth`` (zero point 0) into the kernel.

    ``y = x W = ((x - floor) / s) (s W) + floor * colsum(W)``: the kernel takes the shifted input, and the
    constant ``floor * colsum(W)`` (of the rounded weights) joins the bias that follows, or a new Add.
    Per token: ``max`` (no ``Abs``: the shifted input is never negative), one scale ``max / levels``.
    Twice the resolution of a symmetric scale over an input whose negatives are this small.
    """
    from onnx import helper, numpy_helper

    x, name, y = node.input[0], node.input[1], node.output[0]
    smooth = np.ones(w_q.shape[0]) if smooth is None else smooth
    p = name + ".ft"
    prefix = [
        helper.make_node(
            "Mul", [x, _add(model, p + ".smooth", (1 / smooth).astype(np.float32))], [p + ".s"], name=p + ".s"
        )
    ]
    shifted = p + ".s"
    if floor:
        shift = (-floor / smooth).astype(np.float32)
        prefix.append(helper.make_node("Add", [shifted, _add(model, p + ".shift", shift)], [p + ".in"], name=p + ".in"))
        shifted = p + ".in"
    axes = [_add(model, p + ".axes", np.array([-1], np.int64))] if blocked else []
    prefix += [
        helper.make_node(
            "ReduceMax",
            [shifted, *axes],
            [p + ".max"],
            name=p + ".max",
            keepdims=1,
            **({} if blocked else {"axes": [-1]}),
        ),
        helper.make_node(
            "Max", [p + ".max", _add(model, p + ".tiny", np.array(1e-8, np.float32))], [p + ".range"], name=p + ".range"
        ),
        helper.make_node(
            "Div",
            [p + ".range", _add(model, p + ".levels", np.array(float(levels), np.float32))],
            [p + ".scale"],
            name=p + ".scale",
        ),
    ]
    zero = _add(model, p + ".zp", np.array(0, np.uint8))
    if blocked:
        whole_row = np.iinfo(np.int32).max
        prefix.append(
            helper.make_node(
                "QuantizeLinear", [shifted, p + ".scale"], [p + ".q"], name=p + ".q", axis=-1, block_size=whole_row
            )
        )
    else:
        prefix += [
            helper.make_node("Div", [shifted, p + ".scale"], [p + ".scaled"], name=p + ".scaled"),
            helper.make_node(
                "QuantizeLinear",
                [p + ".scaled", _add(model, p + ".one", np.array(1.0, np.float32)), zero],
                [p + ".q"],
                name=p + ".q",
            ),
        ]
    body = [
        helper.make_node(
            "MatMulIntegerToFloat",
            [
                p + ".q",
                _add(model, name + ".q", w_q),
                _add(model, p + ".unit", np.array(1.0, np.float32)),
                w_scale,
                zero,
                *([w_zp] if w_zp else []),
            ],
            [y + ".w"],
            name=y + ".w",
            domain="com.microsoft",
        ),
        helper.make_node("Mul", [y + ".w", p + ".scale"], [y], name=y),
    ]
    if floor:
        scales = numpy_helper.to_array(_initializers(model)[w_scale]).astype(np.float64)
        rounded = (w_q.astype(np.float64) - (128 if w_zp else 0)) * scales / smooth[:, None]
        body[-1].output[0] = y + ".shifted"
        body.append(
            helper.make_node(
                "Add",
                [y + ".shifted", _add(model, p + ".offset", (floor * rounded.sum(axis=0)).astype(np.float32))],
                [y],
                name=y + ".offset",
            )
        )
    _replace(model, node, prefix + body)
    if floor:
        _fold_offset(model, y + ".offset")


def _fold_offset(model: onnx.ModelProto, name: str) -> None:
    """Merge the constant Add ``name`` into the constant-bias Add that alone follows it, where there is one."""
    from onnx import numpy_helper

    inits = _initializers(model)
    offset = next(n for n in model.graph.node if n.name == name)
    users = [n for n in model.graph.node if offset.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
        return
    other = [i for i in users[0].input if i != offset.output[0]]
    uses = Counter(i for n in model.graph.node for i in n.input)
    if len(other) != 1 or other[0] not in inits or uses[other[0]] != 1:
        return
    bias = numpy_helper.to_array(inits[other[0]])
    extra = numpy_helper.to_array(inits[offset.input[1]])
    if bias.shape != extra.shape:
        return
    _replace_initializer(model, other[0], (bias.astype(np.float64) + extra).astype(np.float32))
    users[0].input[list(users[0].input).index(offset.output[0])] = offset.input[0]
    model.graph.initializer.remove(inits[offset.input[1]])
    _replace(model, offset, [])


# Ops whose outputs keep a steady range from token to token (normalized, or averages of values): the
# inputs a static activation scale suits. A GELU's output does not (a few tokens carry outliers).
_STEADY_PRODUCERS = {
    ("LayerNormalization", ""),
    ("SkipLayerNormalization", "com.microsoft"),
    ("MultiHeadAttention", "com.microsoft"),
    ("Attention", "com.microsoft"),
}


def outlier_projections(model: onnx.ModelProto, hessians: dict[str, np.ndarray], ranges: Ranges) -> list[str]:
    """The half of the projections whose inputs carry the largest outliers on the calibration tokens: the peak
    ``|x|`` over the root-mean-square of ``x``. A per-token int8 scale is set by a token's peak, so the larger
    this ratio, the coarser every other channel's rounding. Measured on the graph, not named for one model."""
    nodes = projection_nodes(model)
    score = {}
    for node in nodes:
        low, high = ranges[node.input[0]]
        energy = float(np.mean(np.diag(hessians[node.input[0]])))
        score[node.name] = float(np.maximum(np.abs(low), np.abs(high)).max()) / max(np.sqrt(energy), 1e-12)
    return sorted(score, key=lambda name: -score[name])[: len(nodes) // 2]


def normalized_projections(model: onnx.ModelProto) -> list[str]:
    """Projections fed by a LayerNormalization or an attention (BERT: qkv, attn_out, ffn_in; not ffn_out)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    steady = []
    for node in projection_nodes(model):
        source = producer.get(node.input[0])
        if source is not None and (source.op_type, source.domain) in _STEADY_PRODUCERS:
            steady.append(node.name)
    return steady


def _quantize_static(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    smooth: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    w_q: np.ndarray,
    weight_scales: dict[str, str],
    levels: int,
    w_zp: str | None,
) -> None:
    """Put ``QuantizeLinear((x - c) / smooth, s, z) -> MatMulIntegerToFloat(+ bias + c W)`` where ``node`` is.

    ``c`` is each channel's mid-range on the calibration tokens: centred, every channel spans about
    ``±half-width / smooth``, so the one scale is set by the widest half-width, not by the channel whose
    values sit furthest from zero (LayerNorm's beta moves whole channels by up to 14 in all-MiniLM-L6-v2's
    ffn_in, three times their half-width). ``(x - c) W = x W - c W``: the constant ``c W`` (of the rounded
    weights) joins the bias in the kernel; ``(x - c) / smooth`` itself costs no pass of its own where ``x``
    is a LayerNormalization's (a second one with its scale and bias so adjusted makes it) or an attention's
    context (on the value bias), else one Mul and one Add.
    """
    from onnx import helper, numpy_helper

    x, name, y = node.input[0], node.input[1], node.output[0]
    center = (low + high) / 2
    # (x - c) / smooth spans [min((low - c) / smooth), max((high - c) / smooth)] on the calibration tokens.
    lowest = min(float(((low - center) / smooth).min()), 0.0)
    highest = max(float(((high - center) / smooth).max()), 0.0)
    scale = max(highest - lowest, 1e-8) / levels
    zero = int(np.clip(np.rint(-lowest / scale), 0, levels))
    p = name + ".st"
    prefix: list[onnx.NodeProto] = []
    normalized = _renormalized(model, x, 1 / smooth, center, p + ".in")
    if normalized is not None:
        prefix.append(normalized)
        x = p + ".in"
    elif not _fold_into_values(model, x, 1 / smooth, weight_scales, shift=center):
        prefix += [
            helper.make_node(
                "Mul", [x, _add(model, p + ".smooth", (1 / smooth).astype(np.float32))], [p + ".s"], name=p + ".s"
            ),
            helper.make_node(
                "Add",
                [p + ".s", _add(model, p + ".center", (-center / smooth).astype(np.float32))],
                [p + ".in"],
                name=p + ".in",
            ),
        ]
        x = p + ".in"
    a_scale = _add(model, p + ".scale", np.array(scale, np.float32))
    a_zero = _add(model, p + ".zp", np.array(zero, np.uint8))
    prefix.append(helper.make_node("QuantizeLinear", [x, a_scale, a_zero], [p + ".q"], name=p + ".q"))
    inputs = [p + ".q", _add(model, name + ".q", w_q), a_scale, weight_scales[y], a_zero, w_zp or ""]
    # The bias that follows folds into the kernel: an Add's (attn_out, ffn_out, an unfused BiasGelu's), or the
    # one a MultiHeadAttention adds to the packed q, k, v it gets through a Split (qkv): onnxruntime's CPU
    # attention with a bias input ran 5-8 % of the whole model slower at batch 1 than without one.
    inits = _initializers(model)
    users = [n for n in model.graph.node if y in n.input]
    out, bias_add, attention, bias_name = y, None, None, ""
    if len(users) == 1 and users[0].op_type == "Add" and users[0].domain in ("", "ai.onnx") and users[0].name:
        other = [i for i in users[0].input if i != y]
        if len(other) == 1 and other[0] in inits:
            bias_add, out, bias_name = users[0], users[0].output[0], other[0]
    elif len(users) == 1 and users[0].op_type == "Split":
        attention = _attention_of_split(model, users[0])
        if attention is not None:
            bias_name = attention.input[3]
    bias = np.zeros(w_q.shape[1])
    if bias_name:
        found = numpy_helper.to_array(inits[bias_name])
        if found.shape != (w_q.shape[1],) or found.dtype != np.float32:
            out, bias_add, attention = y, None, None
        else:
            bias = found.astype(np.float64)
    w_scale = numpy_helper.to_array(inits[weight_scales[y]]).astype(np.float64)
    rounded = (w_q.astype(np.float64) - (128 if w_zp else 0)) * w_scale / smooth[:, None]
    inputs.append(_add(model, p + ".bias", (bias + center @ rounded).astype(np.float32)))
    kernel = helper.make_node("MatMulIntegerToFloat", inputs, [out], name=y + ".w", domain="com.microsoft")
    _replace(model, node, [*prefix, kernel])
    if bias_add is not None:
        _replace(model, bias_add, [])
    if attention is not None:  # found again: _replace rebuilt the node list
        context = attention.output[0]
        next(n for n in model.graph.node if n.output and n.output[0] == context).input[3] = ""
    uses = Counter(i for n in model.graph.node for i in n.input)
    if bias_name and not uses[bias_name]:
        model.graph.initializer.remove(_initializers(model)[bias_name])


def _renormalized(
    model: onnx.ModelProto, x: str, factor: np.ndarray, center: np.ndarray, out: str
) -> onnx.NodeProto | None:
    """A LayerNormalization computing ``(x - center) * factor`` from the input of the one that makes ``x``.

    ``LN(h; g, b) = n(h) g + b``, so ``(LN(h) - c) f = n(h) (g f) + (b - c) f``: one op instead of a Mul and
    an Add after the original (which stays: the residual path needs it). None where ``x`` is not the output
    of a LayerNormalization with constant scale and bias over the last axis.
    """
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    node = next((n for n in model.graph.node if n.output and n.output[0] == x), None)
    if node is None or node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    if any(a.name == "axis" and a.i != -1 for a in node.attribute):
        return None
    gamma = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    beta = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
    if gamma.shape != factor.shape or beta.shape != factor.shape:
        return None
    copy = helper.make_node(
        "LayerNormalization",
        [
            node.input[0],
            _add(model, out + ".scale", (gamma * factor).astype(np.float32)),
            _add(model, out + ".bias", ((beta - center) * factor).astype(np.float32)),
        ],
        [out],
        name=out,
    )
    copy.attribute.extend(node.attribute)
    return copy


def _attention_of_split(model: onnx.ModelProto, split: onnx.NodeProto) -> onnx.NodeProto | None:
    """The MultiHeadAttention that takes ``split``'s three outputs as query, key and value and adds a constant bias."""
    inits = _initializers(model)
    for node in model.graph.node:
        takes_split = node.op_type == "MultiHeadAttention" and list(node.input[:3]) == list(split.output)
        if takes_split and node.domain == "com.microsoft" and len(node.input) > 3 and node.input[3] in inits:
            return node
    return None


def collect_statistics(
    fp32_path: str, feeds: Iterable[dict[str, np.ndarray]], outputs: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], Ranges, dict[str, np.ndarray]]:
    """Every projection input's ``X^T X`` (float64 [K, K]) and per-channel min and max ([K]), over real tokens;
    and the graph's own ``outputs`` asked for, over every batch, from the same pass.

    ``feeds`` yields the graph's inputs per calibration batch (as the runtime feeds them, ``attention_mask``
    among them); padded positions are left out. The per-channel extremes give the exact range of ``x / s``
    over every calibration token for any positive per-channel factor ``s`` (SmoothQuant's): what a static
    activation scale needs.
    """
    import copy

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(fp32_path)
    names = sorted({n.input[0] for n in projection_nodes(model)})
    probe = copy.deepcopy(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    hessians: dict[str, np.ndarray] = {}
    ranges: Ranges = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for feed in feeds:
        mask = feed["attention_mask"]
        values = session.run([*names, *outputs], feed)
        for name, value in zip(outputs, values[len(names) :], strict=True):
            kept[name].append(value)
        for name, value in zip(names, values[: len(names)], strict=True):
            # Per-token activations keep real tokens only; any other input (a head's pooled [batch, hidden],
            # DeBERTa's relative-position table) keeps every row.
            per_token = value.ndim == 3 and value.shape[:2] == mask.shape
            rows = (value[mask.astype(bool)] if per_token else value.reshape(-1, value.shape[-1])).astype(np.float64)
            hessians[name] = hessians.get(name, 0) + rows.T @ rows
            low, high = rows.min(axis=0), rows.max(axis=0)
            if name in ranges:
                low, high = np.minimum(low, ranges[name][0]), np.maximum(high, ranges[name][1])
            ranges[name] = (low, high)
    return hessians, ranges, {name: np.concatenate(values) for name, values in kept.items()}


def gptq_int8(
    weight: np.ndarray, hessian: np.ndarray, damp: float = 0.01, qmax: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding of ``weight`` [K, N] to int8 in ``[-qmax, qmax]`` with one absmax scale per output column.

    Rounds one input row at a time (largest activation energy first) and pushes
    each row's rounding error onto the rows not yet rounded, weighted by the
    inverse input Hessian, so the layer *output* error is minimised rather than
    the weight error. Returns ``(q int8 [K, N], scale float32 [N])``.
    """
    w = weight.astype(np.float64).copy()
    k = w.shape[0]
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / qmax
    h = hessian.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    order = np.argsort(-np.diag(h))
    w, h = w[order], h[order][:, order]
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for row in range(k):
        q[row] = np.clip(np.rint(w[row] / scale), -qmax, qmax)
        err = (w[row] - q[row] * scale) / upper[row, row]
        w[row + 1 :] -= np.outer(upper[row, row + 1 :], err)
    return q[np.argsort(order)].astype(np.int8), scale.astype(np.float32)


def weights_int8_gptq(model: onnx.ModelProto, hessians: dict[str, np.ndarray], skip: Iterable[str] = ()) -> None:
    """Weight-only int8 with input-channel equalisation and GPTQ rounding.

    ``W = diag(r) W'``: rows with large weights are scaled down before per-column
    int8 rounding so a few outlier input channels do not set every column's
    scale (r = sqrt of the row absmax, geometric mean 1). The activation is
    multiplied by ``r`` at run time; ``W'`` is rounded with GPTQ against the
    equally rescaled Hessian. Activations stay fp32, so results do not depend on
    the batch.
    """
    from onnx import helper

    skip = set(skip)
    for node in projection_nodes(model):
        if node.name in skip:
            continue
        x, name = node.input[0], node.input[1]
        weight = _pop_weight(model, name).astype(np.float64)
        r = np.sqrt(np.maximum(np.abs(weight).max(axis=1, keepdims=True), 1e-12))
        r /= np.exp(np.log(r).mean())
        q, scale = gptq_int8(weight / r, hessians[x] * (r * r.T))
        dq = _dequantize_columns(model, name, q, scale)
        mul = helper.make_node(
            "Mul", [x, _add(model, name + ".r", r[:, 0].astype(np.float32))], [name + ".x"], name=name + ".x"
        )
        node.input[0] = name + ".x"
        node.input[1] = name + ".dq"
        _replace(model, node, [dq, mul, node])


def _block_dequantized(model: onnx.ModelProto, name: str, table: np.ndarray, block_size: int) -> list[onnx.NodeProto]:
    """Nodes that rebuild the fp32 constant ``name`` from int8 ``table`` with a scale per block of
    ``block_size`` along its rows: ``Reshape(Cast(q) * scale)`` (folded by onnxruntime at load, or rebuilt
    by ``dequantize_at_load``)."""
    from onnx import TensorProto, helper

    rows, cols = table.shape
    q, scale = quantize_rows_int8(table.reshape(rows * cols // block_size, block_size), axis=0)
    q = q.reshape(rows, cols // block_size, block_size)
    return [
        helper.make_node("Cast", [_add(model, name + ".q", q)], [name + ".f"], name=name + ".f", to=TensorProto.FLOAT),
        helper.make_node(
            "Mul",
            [name + ".f", _add(model, name + ".scale", scale.reshape(rows, cols // block_size, 1))],
            [name + ".blocks"],
            name=name + ".blocks",
        ),
        helper.make_node(
            "Reshape",
            [name + ".blocks", _add(model, name + ".shape", np.array([rows, cols], np.int64))],
            [name],
            name=name,
        ),
    ]


# A looked-up float table smaller than this stays fp32 (token types, MPNet's 32 x 12 relative attention bias).
_SMALL_TABLE = 16384


def position_table_int8(model: onnx.ModelProto, max_length: int, block_size: int = 32) -> None:
    """Position rows as int8 with one scale per block of ``block_size``.

    Every token gets its position row added, so its error is systematic; per-row
    scales cost 0.6 points of recall@5, blocks of 32 cost little. Dequantized
    each run (256 x 384 values: microseconds). A graph written by ``export`` keeps
    its first ``max_length`` rows (its ``Slice``); in a graph the build did not write
    (torch export, a user's ONNX) every constant table a ``Gather`` looks up, other
    than the word embeddings, is quantized whole the same way (positions there are
    computed ids, so no row can be dropped).
    """
    node = next((n for n in model.graph.node if n.op_type == "Slice" and n.input[0] == "position_table"), None)
    if node is not None:
        table = _pop_weight(model, "position_table")[:max_length]
        _replace(model, node, [*_block_dequantized(model, "position_table", table, block_size), node])
        return
    from onnx import TensorProto

    floats = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    uses = Counter(name for n in model.graph.node for name in n.input)
    for node in list(model.graph.node):
        name = node.input[0] if node.op_type == "Gather" and node.input else ""
        if name not in floats or name == WORD_EMBEDDINGS:
            continue
        dims = list(floats[name].dims)
        if len(dims) != 2 or dims[1] % block_size or dims[0] * dims[1] < _SMALL_TABLE:
            continue
        if uses[name] != 1:
            continue  # a table also used elsewhere stays as it is
        table = _pop_weight(model, name)
        _replace(model, node, [*_block_dequantized(model, name, table, block_size), node])


def weights_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """All float weights to fp16, fp32 inputs and outputs kept (for GPU serving)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def gptq_int4_blocks(
    weight: np.ndarray, hessian: np.ndarray, block_size: int = 32, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding of ``weight`` [K, N] to symmetric 4-bit with one scale per ``block_size`` rows per column.

    Rows are rounded in order (a block's scale is fixed when its first row is
    reached, from the error-compensated weights). Returns ``(q in [-8, 7] as
    int8 [K, N], scale float32 [K / block_size, N])``.
    """
    w = weight.astype(np.float64).copy()
    k, n = w.shape
    h = hessian.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    scales = np.zeros((k // block_size, n))
    for row in range(k):
        if row % block_size == 0:
            scales[row // block_size] = np.maximum(np.abs(w[row : row + block_size]).max(axis=0), 1e-12) / 7.0
        scale = scales[row // block_size]
        q[row] = np.clip(np.rint(w[row] / scale), -8, 7)
        err = (w[row] - q[row] * scale) / upper[row, row]
        w[row + 1 :] -= np.outer(upper[row, row + 1 :], err)
    return q.astype(np.int8), scales.astype(np.float32)


def weights_int4(
    model: onnx.ModelProto,
    block_size: int = 32,
    accuracy_level: int = 4,
    hessians: dict[str, np.ndarray] | None = None,
) -> None:
    """Every projection to MatMulNBits: symmetric 4-bit blocks along K (accuracy_level 4: int8 compute).

    Layout per the com.microsoft spec: ``B`` uint8 ``[N, K/block, block/2]`` (low
    nibble first, zero point 8 implied), ``scales`` float ``[N * K/block]``.
    With ``hessians`` the weights are GPTQ-rounded, else rounded to nearest.
    """
    from onnx import helper

    _ensure_ms_opset(model)
    for node in projection_nodes(model):
        name = node.input[1]
        weight = _pop_weight(model, name)
        k, n = weight.shape
        if hessians is not None:
            q_kn, scale_kn = gptq_int4_blocks(weight, hessians[node.input[0]], block_size)
            q = q_kn.T.reshape(n, k // block_size, block_size)
            scale = scale_kn.T.reshape(n, k // block_size, 1)
        else:
            blocks = weight.T.reshape(n, k // block_size, block_size)
            scale = np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-12) / 7.0
            q = np.clip(np.rint(blocks / scale), -8, 7)
        nibbles = (q.astype(np.int16) + 8).astype(np.uint8)
        packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
        _replace(
            model,
            node,
            [
                helper.make_node(
                    "MatMulNBits",
                    [
                        node.input[0],
                        _add(model, name + ".q4", packed),
                        _add(model, name + ".scale", scale.reshape(-1).astype(np.float32)),
                    ],
                    [node.output[0]],
                    name=node.name,
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=4,
                    block_size=block_size,
                    accuracy_level=accuracy_level,
                )
            ],
        )


def dynamic_int8(fp32_path: str, out_path: str) -> None:
    """onnxruntime's quantize_dynamic: per-channel int8 weights, per-tensor dynamic activations."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fp32_path,
        out_path,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        # Shape inference cannot type the outputs of com.microsoft ops; every activation here is float.
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )
