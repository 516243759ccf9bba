"""Named quantization recipes, each with its own fidelity gate.

A recipe turns the fp32 graph file into a quantized graph file. The gate is
what ``build_model`` refuses to publish below; measured figures are in
``bench/QUANTIZATION.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.modelbuild.errors import BuildError
from quantfn.modelbuild.gate import Gate

if TYPE_CHECKING:
    from quantfn.modelbuild.quantize import Ranges

MAX_SEQUENCE_LENGTH = 256
CALIBRATION = "the calibration corpus (quantfn.modelbuild.corpora; the manifest's corpora.calibration)"


class Calibration:
    """Lazily computed activation statistics of the fp32 graph on the calibration texts (one pass for both), and
    the graph's own ``outputs`` asked for (a cascade's fp32 logits) from that pass."""

    def __init__(
        self, fp32_path: Path, feeds: Callable[[], list[dict[str, np.ndarray]]], outputs: Sequence[str] = ()
    ) -> None:
        self._fp32_path = fp32_path
        self._feeds = feeds
        self._outputs = tuple(outputs)
        self._fed: list[dict[str, np.ndarray]] | None = None
        self._statistics: tuple[dict[str, np.ndarray], Ranges, dict[str, np.ndarray]] | None = None

    def feeds(self) -> list[dict[str, np.ndarray]]:
        """The graph inputs of the calibration texts, as the runtime feeds them (made once)."""
        if self._fed is None:
            self._fed = self._feeds()
        return self._fed

    def _collected(self) -> tuple[dict[str, np.ndarray], Ranges, dict[str, np.ndarray]]:
        if self._statistics is None:
            from quantfn.modelbuild.quantize import collect_statistics

            self._statistics = collect_statistics(str(self._fp32_path), self.feeds(), self._outputs)
        return self._statistics

    def hessians(self) -> dict[str, np.ndarray]:
        """Each projection input's ``X^T X``."""
        return self._collected()[0]

    def ranges(self) -> Ranges:
        """Each projection input's per-channel (min, max)."""
        return self._collected()[1]

    def output(self, name: str) -> np.ndarray:
        """The fp32 graph's output ``name`` on every calibration text (asked for when made: ``outputs``)."""
        return self._collected()[2][name]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    gate: Gate
    apply: Callable[[Path, Path, Calibration], None]
    details: dict[str, Any] = field(default_factory=dict)
    # Whether the graph may be saved pre-optimized (only when that keeps the file's size).
    pre_optimize: bool = True
    # SessionOptions config entries the runtime must set when loading this model.
    session_config: dict[str, str] = field(default_factory=dict)
    # Save the optimized graph with its folded int8 weights kept int8 in weights.bin, rebuilt at
    # load (``quantfn.modelbuild.dequantize_at_load``): the cold path skips optimization and folding.
    dequantize_at_load: bool = False
    # Drop unreachable vocabulary rows (renumbers tokenizer.json; see ``vocab``).
    prune_vocab: bool = True
    # A classifier's second graph, this recipe's name, for the inputs near a tie (``modelbuild.cascade``).
    cascade: str | None = None


def max_positions(model: Any) -> int:
    """Position rows a graph needs: its ``quantfn.max_sequence_length`` metadata (a brought model), else 256."""
    declared = {p.key: p.value for p in model.metadata_props}.get("quantfn.max_sequence_length")
    return int(declared) if declared else MAX_SEQUENCE_LENGTH


def _rewrite(fp32_path: Path, out_path: Path, *steps: Callable[[Any], Any]) -> None:
    import onnx

    model = onnx.load(str(fp32_path))
    for step in steps:
        result = step(model)  # a step rewrites in place, or returns the new model (anything else: a count)
        if isinstance(result, onnx.ModelProto):
            model = result
    onnx.save_model(model, str(out_path))


def _tables_int8() -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """Every int8 recipe's last steps: the word-embedding table and the position table to int8 per row."""
    from quantfn.modelbuild import quantize as q

    return q.embedding_int8, lambda m: q.position_table_int8(m, max_positions(m))


def _fp32(src: Path, dst: Path, _: Calibration) -> None:
    _rewrite(src, dst)


def _fp16(src: Path, dst: Path, _: Calibration) -> None:
    from quantfn.modelbuild import quantize as q

    _rewrite(src, dst, q.weights_fp16)


def _int8_gptq(src: Path, dst: Path, calibration: Calibration) -> None:
    from quantfn.modelbuild import quantize as q

    hessians = calibration.hessians()
    _rewrite(
        src,
        dst,
        lambda m: q.weights_int8_gptq(m, hessians),
        *_tables_int8(),
    )


def _per_token(weight_max: int) -> Callable[[Path, Path, Calibration], None]:
    """W8A8 (``weight_max`` 127) or W7A8 (63) with per-token dynamic activation scales; SmoothQuant alpha 0.5."""

    def apply(src: Path, dst: Path, calibration: Calibration) -> None:
        from quantfn.modelbuild import quantize as q

        hessians = calibration.hessians()
        _rewrite(
            src,
            dst,
            lambda m: q.per_token_int8(m, hessians=hessians, alpha=0.5, weight_max=weight_max),
            *_tables_int8(),
        )

    return apply


def _static_w7a8(calibration: Calibration, steady_only: bool = False) -> Callable[[Any], None]:
    """int8-static's step: static W7A8 in the projections whose input keeps a steady range
    (``quantize.normalized_projections``), per-token W7A8 in the others, or (``steady_only``) the others left
    fp32 for a later step."""
    from quantfn.modelbuild import quantize as q

    hessians, ranges = calibration.hessians(), calibration.ranges()

    def step(m: Any) -> None:
        steady = q.normalized_projections(m)
        others = [node.name for node in q.projection_nodes(m) if node.name not in steady] if steady_only else []
        q.per_token_int8(
            m,
            skip=others,
            hessians=hessians,
            alpha=0.5,
            static_alpha=0.75,
            weight_max=63,
            static=steady,
            ranges=ranges,
        )

    return step


def _int8_static(src: Path, dst: Path, calibration: Calibration) -> None:
    _rewrite(src, dst, _static_w7a8(calibration), *_tables_int8())


def _int8_steady(src: Path, dst: Path, calibration: Calibration) -> None:
    from quantfn.modelbuild import quantize as q

    hessians = calibration.hessians()
    # the projections left in fp32 (after GELU, after an unfused attention) become weight-only int8
    _rewrite(
        src,
        dst,
        _static_w7a8(calibration, steady_only=True),
        lambda m: q.weights_int8_gptq(m, hessians),
        *_tables_int8(),
    )


def _int8_mixed(src: Path, dst: Path, calibration: Calibration) -> None:
    from quantfn.modelbuild import quantize as q

    hessians, ranges = calibration.hessians(), calibration.ranges()
    _rewrite(
        src,
        dst,
        # the half of the projections int8 activations would hurt most (measured, not named) stay fp32 compute
        lambda m: q.per_token_int8(m, skip=q.outlier_projections(m, hessians, ranges), hessians=hessians, alpha=0.5),
        # then every projection still in fp32 (the skipped ones) becomes weight-only int8
        lambda m: q.weights_int8_gptq(m, hessians),
        *_tables_int8(),
    )


def _int8_dynamic(src: Path, dst: Path, _: Calibration) -> None:
    import tempfile

    from quantfn.modelbuild import quantize as q

    with tempfile.TemporaryDirectory() as tmp:
        mid = Path(tmp) / "embedding.onnx"
        _rewrite(src, mid, *_tables_int8())
        q.dynamic_int8(str(mid), str(dst))


def _int4(src: Path, dst: Path, calibration: Calibration) -> None:
    from quantfn.modelbuild import quantize as q

    hessians = calibration.hessians()
    _rewrite(
        src,
        dst,
        lambda m: q.weights_int4(m, hessians=hessians),
        *_tables_int8(),
    )


def _weight_only_at_load() -> dict[str, Any]:
    """The Recipe options of a graph with weight-only projections: saved optimized at build time with their int8
    weights in weights.bin, rebuilt to fp32 at load. onnxruntime would otherwise fuse DequantizeLinear+MatMul into
    8-bit MatMulNBits with int8 activations (4x the error); with QDQ fusion off it folds the weights once."""
    return {"pre_optimize": False, "session_config": {"session.disable_quant_qdq": "1"}, "dequantize_at_load": True}


RECIPES: dict[str, Recipe] = {
    "int8-weight": Recipe(
        "int8-weight",
        "int8 weight-only: input-channel equalised, GPTQ-rounded per-channel int8 projections "
        "(stored int8, dequantized to fp32 once at load into a graph optimized at build time), int8 per-row "
        "word and position embeddings; fp32 activations",
        Gate(),
        _int8_gptq,
        {
            "weights": "int8 per-output-channel, GPTQ, input-channel equalisation",
            "activations": "fp32",
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
        **_weight_only_at_load(),
    ),
    "fp32": Recipe(
        "fp32",
        "fp32: the exported graph as it is (the default ladder's last rung: a model every int8 rung missed is "
        "published in full precision)",
        # Against its own fp32 original only float noise can differ; nothing but that is held against it.
        Gate(
            task_retention=None,
            cosine_mean=0.9999,
            cosine_min=0.999,
            batch_invariance_min_cosine=None,
            max_size_ratio=None,
            top1_agreement=0.999,
            score_spearman=0.999,
        ),
        _fp32,
        {"weights": "fp32"},
        prune_vocab=False,
    ),
    "fp16": Recipe(
        "fp16",
        "fp16 weights, fp32 inputs/outputs (for the GPU container; slow on CPU)",
        Gate(0.999, 0.999, 0.998, None, 0.55, cosine_p1=0.998),
        _fp16,
        {"weights": "fp16"},
    ),
    "int8-token": Recipe(
        "int8-token",
        "W8A8: SmoothQuant (alpha 0.5) + GPTQ per-channel int8 weights, per-token dynamic int8 activations "
        "(MatMulInteger); batch invariant, lower recall (measured cosine 0.9989, recall@5 0.946). Full-range int8 "
        "weights: on a CPU without VNNI (AVX2, all that Lambda promises) onnxruntime's kernel saturates 16-bit pair "
        "sums, so results there differ from a VNNI build host's; int8-token7 does not",
        Gate(),
        _per_token(127),
        {
            "weights": "int8 per-output-channel, SmoothQuant alpha 0.5, GPTQ",
            "activations": "int8 dynamic per token",
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
    ),
    "int8-token7": Recipe(
        "int8-token7",
        "W7A8: int8-token with weights rounded to 7 bits ([-63, 63]): onnxruntime's u8 x s8 kernel on CPUs "
        "without VNNI (vpmaddubsw) saturates 16-bit pair sums with full-range int8 weights; 7-bit weights never do, "
        "so the result is the same on every x86 CPU; batch invariant. Per-token scales go straight into a blocked "
        "QuantizeLinear (opset 21) and the output projection's SmoothQuant factors into the value columns",
        Gate(),
        _per_token(63),
        {
            "weights": "int7 in int8 storage, per-output-channel, SmoothQuant alpha 0.5, GPTQ",
            "activations": "int8 dynamic per token",
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
    ),
    "int8-static": Recipe(
        "int8-static",
        "W7A8 with static activation scales where activations keep a steady range: the projections fed by a "
        "LayerNormalization or an attention (qkv, attn_out, ffn_in) take each channel centred on its calibration "
        "mid-range (on a second LayerNormalization or the value bias) and smoothed by its half-width (alpha 0.75), "
        "then one calibrated scale and zero point (the whole calibration range), their bias inside the kernel; the "
        "ones after GELU (ffn_out) keep per-token scales over the input shifted by GELU's floor (uint8 0..255, "
        "SmoothQuant alpha 0.5). GPTQ 7-bit weights; batch invariant",
        Gate(),
        _int8_static,
        {
            "weights": "int7 in int8 storage, per-output-channel, SmoothQuant (alpha 0.75 static, 0.5 per token), GPTQ",
            "activations": "uint8 static per tensor (channels centred) after LayerNorm and attention, "
            "per token above GELU's floor after GELU",
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
    ),
    "int8-cascade": Recipe(
        "int8-cascade",
        "classifiers: int8-static for every input, and int8-weight (fp32 compute) for the inputs whose int8 logits "
        "are within a margin of another decision (top-1 minus top-2 logit; a sigmoid logit's distance from 0); "
        "the margin is the 99.5th percentile, on the calibration texts, of what the int8 graph's logit moves took "
        "from another label against the int8 winner",
        # two graphs of the model ship: twice one int8 graph's size
        Gate(max_size_ratio=0.5),
        _int8_static,
        {
            "weights": "int7 in int8 storage (int8-static), and int8 per-output-channel (int8-weight) for near ties",
            "activations": "as int8-static; fp32 for the near ties",
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
        cascade="int8-weight",
    ),
    "int8-steady": Recipe(
        "int8-steady",
        "int8-static's static W7A8 in the projections whose input keeps a steady range (fed by a LayerNormalization "
        "or a fused attention: BERT's qkv, attn_out, ffn_in), weight-only int8 with fp32 compute in the rest (after "
        "GELU, or after an unfused attention's reshape), no per-token scales; for models whose int8 error over many "
        "layers adds up past the gate",
        Gate(),
        _int8_steady,
        {
            "weights": "int7 in int8 storage (static projections), int8 per-output-channel GPTQ (the rest)",
            "activations": "uint8 static per tensor (channels centred) after LayerNorm and a fused attention; fp32 in "
            "the rest",
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
        **_weight_only_at_load(),
    ),
    "int8-mixed": Recipe(
        "int8-mixed",
        "mixed: half the projections W8A8 (per-token dynamic int8 activations, SmoothQuant 0.5, GPTQ), the half "
        "whose inputs carry the largest outliers on the calibration texts weight-only int8 with fp32 compute; "
        "batch invariant. Full-range int8 weights, which saturate on a CPU without VNNI as int8-token's do",
        Gate(),
        _int8_mixed,
        {
            "weights": "int8 per-output-channel, GPTQ (SmoothQuant alpha 0.5 or input-channel equalisation)",
            "activations": "int8 dynamic per token in half the projections, fp32 in the half with the largest "
            "input outliers (peak over root-mean-square on the calibration texts)",
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
        **_weight_only_at_load(),
    ),
    "int8-dynamic": Recipe(
        "int8-dynamic",
        "onnxruntime quantize_dynamic: per-channel int8 weights, per-tensor dynamic activations; fastest, "
        "NOT batch invariant (measured cosine 0.9924, recall@5 0.863, batch invariance 0.981)",
        Gate(0.99, 0.99, 0.97, None, 0.25, cosine_p1=0.97),
        _int8_dynamic,
        {
            "weights": "int8 per-output-channel",
            "activations": "int8 dynamic per tensor",
            "embeddings": "int8 per-row",
            "batch_invariant": False,
        },
    ),
    "int4": Recipe(
        "int4",
        "MatMulNBits 4-bit symmetric blocks of 32, GPTQ-rounded, accuracy_level 4 (int8 compute); int8 embeddings "
        "(smallest; measured cosine 0.986, recall@5 0.83)",
        Gate(0.98, 0.98, 0.96, 0.9999, 0.21, cosine_p1=0.96),
        _int4,
        {
            "weights": "int4 block 32 symmetric (MatMulNBits), GPTQ",
            "accuracy_level": 4,
            "embeddings": "int8 per-row",
            "calibration": CALIBRATION,
        },
    ),
}

# ``default`` is not one recipe but the first of these that passes the model's gate: W7A8 with static
# scales where activations keep a steady range needs no per-token ops there (fewest kernels: the fastest
# single text, bench/QUANTIZATION.md round 9); W7A8 with every scale per token is next; where int8
# activations cost more than the gate allows (the intent classifier flips 2 % of near-tied decisions), a
# classifier gets the cascade: int8-static for every input, weight-only for its near ties (an embedder cannot
# apply it and moves on); where the error of int8 after GELU adds up over many layers (all-mpnet-base-v2's
# twelve), int8-steady keeps int8 only where activations keep a steady range; then the model is published
# weight-only, fp32 compute, as fast as fp32 and closest to it. The last rung, fp32,
# always publishes: a valid model is never refused because no int8 rung passed (the manifest's ``rejected``
# says what each missed, or why it could not apply).
DEFAULT_LADDER = ("int8-static", "int8-token7", "int8-cascade", "int8-steady", "int8-weight", "fp32")
RECIPE_NAMES = ("default", *RECIPES)


def recipe_ladder(name: str) -> tuple[str, ...]:
    """The recipes a build tries in order for ``name``: ``DEFAULT_LADDER`` for ``default``, else ``name``."""
    if name == "default":
        return DEFAULT_LADDER
    if name not in RECIPES:
        raise BuildError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPE_NAMES)}")
    return (name,)
