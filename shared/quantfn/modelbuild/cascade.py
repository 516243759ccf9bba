"""A classifier's cascade: its int8 graph answers every input, a second graph the near ties.

A classifier's int8 activations move its logits a little (all-MiniLM-L6-v2's intent head: 0.12 at the median
per text, bench/QUANTIZATION.md), and a decision changes only where the int8 winner's lead over another label
is smaller than what the move took from that label against the winner (a sigmoid label: where its logit is
within its move of 0). So the build measures the moves on the calibration texts, the int8 graph against the
fp32 one, and sets the margin to their ``QUANTILE`` (``margin``); at run time an input whose int8 logits are
within the margin of another decision is run again by the second graph (``quantfn.tasks.classify``), the
weight-only build of the same model. The gate then measures the pair as it is served, on the gate texts,
which the margin never saw.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FILE = "fallback.onnx"
WEIGHTS_FILE = "fallback.weights.bin"
# The share of calibration texts whose decision-changing move the margin covers (the rest are what the gate's
# 1 % of allowed flips has to absorb, with the second graph's own).
QUANTILE = 0.995


def logits(graph: Path, session: dict[str, Any], feeds: list[dict[str, np.ndarray]], output: str) -> np.ndarray:
    """``graph``'s logits on ``feeds``, opened as the runtime opens a graph with this ``session`` record."""
    from quantfn.models.manifest import FileEntry, GraphSession
    from quantfn.models.session import create_session

    files = {path.name: FileEntry("", path.stat().st_size) for path in graph.parent.iterdir() if path.is_file()}
    spec = GraphSession.from_dict(session, files)
    opened = create_session(
        graph, threads=2, pre_optimized=spec.pre_optimized, config=spec.config, dequantize=spec.dequantize_at_load
    )
    return np.concatenate([opened.run([output], feed)[0] for feed in feeds]).astype(np.float32)


def margin(int8: np.ndarray, fp32: np.ndarray, scoring: str) -> dict[str, Any]:
    """The cascade's margin from the int8 and fp32 logits of the same calibration texts, with what it rests on.

    An input keeps the int8 graph's decision when no label can overtake the int8 winner: with ``move`` = int8 -
    fp32 logits, label j overtakes only if the int8 gap (winner - j) is below move[winner] - move[j]; the margin
    is the ``QUANTILE`` of that largest pair move per text. A sigmoid label (or a single logit) flips only if
    its logit is within its own move of 0: the quantile of the largest |move|.
    """
    move = int8.astype(np.float64) - fp32
    if scoring == "sigmoid" or int8.shape[1] == 1:
        per_text, rule = np.abs(move).max(axis=1), "the largest |int8 - fp32| logit move per text"
    else:
        winner = move[np.arange(len(move)), int8.argmax(axis=1)]
        per_text = (winner[:, None] - move).max(axis=1)
        rule = "the most any label's int8 - fp32 move fell behind the int8 winner's, per text"
    bound = float(np.quantile(per_text, QUANTILE))
    return {
        "margin": round(max(bound, 0.0), 6),
        "calibration": {
            "texts": len(per_text),
            "move_median": round(float(np.median(per_text)), 6),
            "move_max": round(float(per_text.max()), 6),
            "rule": f"the {QUANTILE:.1%} quantile of {rule} (int8 graph vs fp32, calibration texts)",
        },
    }


def build(
    staging: Path,
    recipe: str,
    write_graph: Callable[[Path, str], dict[str, Any]],
    main_session: dict[str, Any],
    feeds: list[dict[str, np.ndarray]],
    fp32_logits: np.ndarray,
    output: str,
    scoring: str,
) -> dict[str, Any]:
    """Write the second graph (``recipe``, by ``write_graph(path, weights file)``, which returns its session
    record) beside ``staging/model.onnx`` (opened with ``main_session``) and return the manifest's
    ``cascade``, its margin measured on ``feeds`` (the calibration texts) against the fp32 graph's logits on
    them (``fp32_logits``, from the calibration pass)."""
    session = write_graph(staging / FILE, WEIGHTS_FILE)
    int8 = logits(staging / "model.onnx", main_session, feeds, output)
    found = margin(int8, fp32_logits, scoring)
    return {"file": FILE, "recipe": recipe, "session": session, **found}


__all__ = ["FILE", "QUANTILE", "WEIGHTS_FILE", "build", "logits", "margin"]
