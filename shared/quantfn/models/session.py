"""onnxruntime session creation, in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from quantfn.errors import IntegrityError
from quantfn.models.manifest import DequantizeAtLoad, GraphSession, Manifest
from quantfn.tracing import subsegment


def cpu_only(providers: Sequence[str]) -> bool:
    """True when ``providers`` name onnxruntime's CPU provider alone."""
    return all(p == "CPUExecutionProvider" for p in providers)


def open_session(
    model_file: Path,
    manifest: Manifest,
    threads: int,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    session: GraphSession | None = None,
) -> Any:
    """Create an InferenceSession for a model folder's ``model.onnx`` as its manifest says (or for another graph
    of the folder, ``model_file``, as ``session`` says: a cascade's).

    See ``create_session``; the build evaluates models through the same function.
    """
    spec = session or manifest.session
    with subsegment("session_create", model=manifest.model_id):
        return create_session(
            model_file,
            threads=threads,
            pre_optimized=spec.pre_optimized,
            config=spec.config,
            dequantize=spec.dequantize_at_load,
            providers=providers,
        )


# Fusions onnxruntime's CPU provider would apply that make the graph slower: its SkipLayerNormalization
# kernel measured 4.8 ns per element against 0.7 for Add + Add + LayerNormalization (1 thread, [32, 25, 384],
# onnxruntime 1.31.1): 23 % of an int8 model's run time. The build's optimized graphs are saved without it.
# Its BiasGelu is slower than Add + Gelu (opset 20) too (``quantize.unfuse_bias_gelu``); graphs below
# opset 20 are written with BiasGelu itself, which this does not touch.
SLOW_CPU_FUSIONS = ("SkipLayerNormFusion", "BiasGeluFusion")


def create_session(
    model_file: Path,
    *,
    threads: int,
    pre_optimized: bool = False,
    config: Mapping[str, str] | None = None,
    dequantize: DequantizeAtLoad | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Any:
    """An InferenceSession (CPU unless ``providers`` says otherwise) with ``threads`` intra-op threads.

    A model the build saved already optimized is loaded with graph optimization
    off: the optimizer's work was done once at build time, not on every cold start.
    Others get the EXTENDED level (ALL adds layout changes specific to one CPU).
    ``config`` entries are applied as they are: a recipe may depend on one.

    With ``dequantize``, the graph's big fp32 weights are not in ``model.onnx``:
    they are made here from the int8 weights file (``q * scale``, the same
    arithmetic as DequantizeLinear, checked bit for bit at build time) and handed
    to onnxruntime as initializers, so the file stays int8-sized and the cold
    path skips both graph optimization and constant folding.
    """
    import onnxruntime as ort  # deferred: importing it costs ~100 ms of cold start

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if pre_optimized else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    # onnxruntime uses these buffers in place: each OrtValue (which holds its numpy array) must live
    # as long as the session, so the session keeps them.
    weights = dequantized_weights(model_file.parent, dequantize) if dequantize else []
    values = [ort.OrtValue.ortvalue_from_numpy(array) for _, array in weights]
    for (name, _), value in zip(weights, values, strict=True):
        options.add_initializer(name, value)
    session = ort.InferenceSession(
        str(model_file),
        sess_options=options,
        providers=list(providers),
        disabled_optimizers=list(SLOW_CPU_FUSIONS) if cpu_only(providers) and not pre_optimized else None,
    )
    session.quantfn_initializers = values
    return session


def dequantized_weights(folder: Path, spec: DequantizeAtLoad) -> list[tuple[str, Any]]:
    """``[(initializer name, fp32 array)]`` from the weights file ``spec`` describes."""
    import numpy as np

    data = (folder / spec.file).read_bytes()
    tensors = []
    for tensor in spec.tensors:
        try:
            q, scale = (
                np.frombuffer(data, dtype=part.dtype, count=part.count, offset=part.offset).reshape(part.shape)
                for part in (tensor.q, tensor.scale)
            )
            tensors.append((tensor.name, np.multiply(q, scale, dtype=np.float32).reshape(tensor.shape)))
        except ValueError as exc:  # short file, or shapes that do not fit: the manifest and file disagree
            raise IntegrityError(f"{spec.file} does not hold tensor {tensor.name!r} as the manifest says") from exc
    return tensors
