"""onnxruntime session creation, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantfn.models.manifest import Manifest


def open_session(
    model_file: Path, manifest: Manifest, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> Any:
    """Create an InferenceSession (CPU unless ``providers`` says otherwise) with ``threads`` intra-op threads.

    A model the build saved already optimized is loaded with graph optimization
    off: the optimizer's work was done once at build time, not on every cold start.
    Others get the EXTENDED level (ALL adds layout changes specific to one CPU).
    The manifest's ``session.config`` entries are applied as they are: a recipe
    may depend on one (the int8 default needs ``session.disable_quant_qdq`` or
    onnxruntime fuses its weights into a slower, less accurate int8 kernel).
    """
    import onnxruntime as ort  # deferred: importing it costs ~100 ms of cold start

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if manifest.pre_optimized
        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    for key, value in manifest.session_config.items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_file), sess_options=options, providers=list(providers))
