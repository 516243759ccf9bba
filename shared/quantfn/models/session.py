"""onnxruntime session creation, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def open_session(
    model_file: Path, threads: int, pre_optimized: bool, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> Any:
    """Create an InferenceSession (CPU unless ``providers`` says otherwise) with ``threads`` intra-op threads.

    A model the build saved already optimized is loaded with graph optimization
    off: the optimizer's work was done once at build time, not on every cold start.
    """
    import onnxruntime as ort  # deferred: importing it costs ~100 ms of cold start

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if pre_optimized else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_file), sess_options=options, providers=list(providers))
