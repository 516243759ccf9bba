"""The fp32 ONNX graph of the BERT encoder, written directly from safetensors.

No torch: every node is emitted with ``onnx.helper``. The graph already uses
onnxruntime's fused CPU kernels (MultiHeadAttention, BiasGelu; the residual and
LayerNormalization stay three plain ops, see ``residual_layer_norm``) so it needs no
transformer optimizer pass, and every projection stays
a plain ``MatMul`` with a constant ``[K, N]`` weight, which is the one pattern
the quantization recipes rewrite.

Contract: inputs ``input_ids`` and ``attention_mask`` (int64 [batch, sequence]);
output ``last_hidden_state`` (float32 [batch, sequence, hidden]). Token type ids
are zero for a single text, so the type-0 row is folded into the position
table and the input is dropped; a pair model (cross-encoder) takes
``token_type_ids`` as a third input and adds the difference of its type row.
With ``head="sequence_classification"`` the graph ends in BERT's pooler
(CLS -> dense -> tanh) and classifier, output ``logits`` [batch, labels].
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

OPSET = 17
MS_OPSET = 1
INPUTS = ("input_ids", "attention_mask")
PAIR_INPUTS = (*INPUTS, "token_type_ids")
OUTPUT = "last_hidden_state"
LOGITS = "logits"
HEADS = ("none", "sequence_classification")
WORD_EMBEDDINGS = "word_embeddings"


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file (or a pytorch_model.bin, read with torch) as float32-or-integer numpy
    arrays; bf16 and fp16 checkpoints (``dtype``/``torch_dtype`` in config.json) are widened to fp32."""
    if path.suffix == ".bin":
        import torch  # build-time only: a pickled checkpoint has no other reader

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}
    from safetensors.numpy import load_file

    try:
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in load_file(str(path)).items()}
    except TypeError:  # bfloat16 has no numpy dtype: torch reads it
        from safetensors.torch import load_file as load_torch

        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in load_torch(str(path)).items()}


def strip_prefix(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys of a task model (``bert.embeddings...``) as the base model names them (``embeddings...``)."""
    if any(k.startswith("embeddings.") for k in weights):
        return weights
    return {k.removeprefix("bert."): v for k, v in weights.items()}


def residual_layer_norm(
    node: Callable[..., str],
    const: Callable[[str, np.ndarray], str],
    w: Callable[[str], np.ndarray],
    projected: str,
    residual: str,
    source: str,
    names: tuple[str, str],
    out: str,
    eps: float,
) -> str:
    """``LayerNorm(projected + dense.bias + residual)`` as Add, Add, LayerNormalization.

    ``source`` is the checkpoint prefix of BERT's ``...output.`` block (its ``dense.bias`` and
    ``LayerNorm``); ``names`` the graph names of the projection and the norm. Not onnxruntime's
    fused SkipLayerNormalization: its CPU kernel measured 4.8 ns per element against 0.7 for
    these three ops (1 thread, [32, 25, 384], onnxruntime 1.31.1), a quarter of an int8 model's
    run time. The build's optimizer passes keep it from fusing them back
    (``quantfn.models.session.SLOW_CPU_FUSIONS``).
    """
    projection, norm = names
    biased = node("Add", [projected, const(f"{projection}.bias", w(source + "dense.bias"))], f"{projection}.biased")
    summed = node("Add", [biased, residual], f"{norm}.input")
    gamma = const(f"{norm}.gamma", w(source + "LayerNorm.weight"))
    beta = const(f"{norm}.beta", w(source + "LayerNorm.bias"))
    return node("LayerNormalization", [summed, gamma, beta], out, axis=-1, epsilon=eps)


def build_fp32_graph(
    weights: dict[str, np.ndarray],
    config: dict[str, Any],
    *,
    token_types: bool = False,
    head: str = "none",
    name: str = "all-minilm-l6-v2",
) -> onnx.ModelProto:
    """Return the fp32 encoder as an ONNX model (opset 17 + com.microsoft).

    ``token_types`` adds the ``token_type_ids`` input; ``head`` is one of HEADS.
    """
    from onnx import TensorProto, helper, numpy_helper

    if head not in HEADS:
        raise ValueError(f"head {head!r} is not one of {HEADS}")
    weights = strip_prefix(weights)

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], output: str, domain: str = "", **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def w(key: str) -> np.ndarray:
        return weights[key].astype(np.float32)

    # Embeddings: word + (position + type 0), then LayerNorm.
    e = "embeddings."
    word = node("Gather", [const(WORD_EMBEDDINGS, w(e + "word_embeddings.weight")), "input_ids"], "word_vectors")
    positions = w(e + "position_embeddings.weight") + w(e + "token_type_embeddings.weight")[0]
    seq_len = node("Shape", ["input_ids"], "sequence_length", start=1, end=2)
    pos = node(
        "Slice",
        [
            const("position_table", positions),
            const("zero_1d", np.array([0], np.int64)),
            seq_len,
            const("axis_0", np.array([0], np.int64)),
        ],
        "position_vectors",
    )
    summed = node("Add", [word, pos], "embedding_sum")
    if token_types:
        types = w(e + "token_type_embeddings.weight")
        # Type 0 is already in the position table: add only each type's difference from it.
        delta = node("Gather", [const("token_type_delta", types - types[0]), "token_type_ids"], "type_vectors")
        summed = node("Add", [summed, delta], "embedding_sum_typed")
    x = node(
        "LayerNormalization",
        [summed, const("emb_ln_gamma", w(e + "LayerNorm.weight")), const("emb_ln_beta", w(e + "LayerNorm.bias"))],
        "embedding_output",
        axis=-1,
        epsilon=eps,
    )
    mask = node("Cast", ["attention_mask"], "key_padding_mask", to=TensorProto.INT32)

    for i in range(layers):
        p = f"encoder.layer.{i}."
        a = p + "attention."
        # One [hidden, 3*hidden] projection for Q, K and V: one activation pass to quantize instead of three.
        qkv_w = np.concatenate([w(a + f"self.{n}.weight").T for n in ("query", "key", "value")], axis=1)
        qkv_b = np.concatenate([w(a + f"self.{n}.bias") for n in ("query", "key", "value")])
        qkv = node("MatMul", [x, const(f"l{i}.qkv.weight", qkv_w)], f"l{i}.qkv")
        nodes.append(
            helper.make_node(
                "Split", [qkv], [f"l{i}.q", f"l{i}.k", f"l{i}.v"], name=f"l{i}.split", axis=-1, num_outputs=3
            )
            if OPSET >= 18
            else helper.make_node(
                "Split",
                [qkv, const(f"l{i}.split_sizes", np.array([hidden] * 3, np.int64))],
                [f"l{i}.q", f"l{i}.k", f"l{i}.v"],
                name=f"l{i}.split",
                axis=-1,
            )
        )
        ctx = node(
            "MultiHeadAttention",
            [f"l{i}.q", f"l{i}.k", f"l{i}.v", const(f"l{i}.qkv.bias", qkv_b), mask],
            f"l{i}.context",
            domain="com.microsoft",
            num_heads=heads,
        )
        attn = node("MatMul", [ctx, const(f"l{i}.attn_out.weight", w(a + "output.dense.weight").T)], f"l{i}.attn_out")
        x = residual_layer_norm(
            node, const, w, attn, x, a + "output.", (f"l{i}.attn_out", f"l{i}.attn_ln"), f"l{i}.attention_output", eps
        )
        up = node("MatMul", [x, const(f"l{i}.ffn_in.weight", w(p + "intermediate.dense.weight").T)], f"l{i}.ffn_in")
        act = node(
            "BiasGelu",
            [up, const(f"l{i}.ffn_in.bias", w(p + "intermediate.dense.bias"))],
            f"l{i}.gelu",
            domain="com.microsoft",
        )
        down = node("MatMul", [act, const(f"l{i}.ffn_out.weight", w(p + "output.dense.weight").T)], f"l{i}.ffn_out")
        out = OUTPUT if i == layers - 1 and head == "none" else f"l{i}.output"
        x = residual_layer_norm(node, const, w, down, x, p + "output.", (f"l{i}.ffn_out", f"l{i}.out_ln"), out, eps)

    output = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", "sequence", hidden])
    if head == "sequence_classification":
        # BERT's pooler reads the first ([CLS]) token; both dense layers stay MatMul + Add so they quantize too.
        # A scalar index drops the sequence axis (const() would make it [1], which keeps it).
        inits.append(numpy_helper.from_array(np.array(0, np.int64), "cls_index"))
        cls = node("Gather", [x, "cls_index"], "cls_vector", axis=1)
        dense = node("MatMul", [cls, const("pooler.weight", w("pooler.dense.weight").T)], "pooler")
        pooled = node(
            "Tanh", [node("Add", [dense, const("pooler.bias", w("pooler.dense.bias"))], "pooler_biased")], "pooled"
        )
        scores = node("MatMul", [pooled, const("classifier.weight", w("classifier.weight").T)], "classifier")
        node("Add", [scores, const("classifier.bias", w("classifier.bias"))], LOGITS)
        labels = int(weights["classifier.weight"].shape[0])
        output = helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", labels])
    inputs = PAIR_INPUTS if token_types else INPUTS
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in inputs],
        [output],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)],
        producer_name="quantfn.modelbuild",
    )
    model.ir_version = 8
    return model
