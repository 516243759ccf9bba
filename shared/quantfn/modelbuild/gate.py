"""The one gate every build passes, whatever its task: minimums on what ``evaluate`` measured.

A rung of the ladder is published only when each figure its task measures reaches
the gate (``Gate.check``): fidelity against the fp32 original on the fidelity corpus
(embed: cosine mean and minimum, recall@5 where asked, batch invariance; classify:
top-1 agreement; rerank: Spearman of the scores), the file size against fp32, and the
retention of every task-quality score (``quality``). Figures a task does not measure
are absent and so never checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quantfn.modelbuild.errors import BuildGateError

# The figures each task's fidelity is gated on, in the order they are checked (the first miss is reported).
GATED = {
    "embed": ("cosine_mean", "cosine_p1", "cosine_min", "recall_at_5", "batch_invariance_min_cosine"),
    "classify": ("top1_agreement",),
    "rerank": ("score_spearman",),
}
# What a recipe leaves fp32 (biases, LayerNorm, scales) weighs more where no vocabulary rows are pruned:
# all-mpnet-base-v2 ships 25.1 % of its fp32 graph. Hence a half-point allowance on the size ratio; a
# recipe that quantized nothing still fails.
SIZE_ALLOWANCE = 0.005


def int8_floor(graph: Path) -> float:
    """The smallest size ratio int8 storage can reach for this fp32 graph: every matrix one byte per value plus
    a float scale per row, every vector (bias, norm) as it is. A small model's floor is above a quarter (a 32-wide
    embedding row carries a 4-byte scale per 32 bytes), so its int8 rungs are held to the floor, not to 0.25."""
    import onnx

    total = floor = 0
    for tensor in onnx.load(str(graph), load_external_data=False).graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        size = count * (4 if tensor.data_type == onnx.TensorProto.FLOAT else 8)
        total += size
        floor += count + 4 * int(tensor.dims[0]) if len(tensor.dims) >= 2 else size
    return floor / max(total, 1)


@dataclass(frozen=True)
class Gate:
    """Minimums a build must reach; ``None`` means the figure is reported but not gated.

    ``task_retention`` holds every task-quality score (``quantfn.modelbuild.quality``) divided
    by the fp32 original's; ``cosine_*`` (mean, 1st percentile, minimum over the gate corpus:
    the worst cases, not only the average), ``recall_at_5`` and ``batch_invariance_min_cosine``
    an embedder's vectors against the fp32 original's; ``max_size_ratio`` the shipped weights
    against the fp32 graph. A classifier is held to top-1 agreement with its fp32 original
    (99 %: an int8 encoder flips about 0.7 % of near-tied decisions on the suite's texts), on
    the corpus and as its task retention; a cross-encoder to the rank order of its scores.
    """

    task_retention: float | None = 0.995
    cosine_mean: float | None = 0.998
    cosine_min: float | None = 0.99
    batch_invariance_min_cosine: float | None = 0.9999
    max_size_ratio: float | None = 0.25
    recall_at_5: float | None = None
    top1_agreement: float | None = 0.99
    score_spearman: float | None = 0.99
    cosine_p1: float | None = 0.995

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def check(
        self,
        model_id: str,
        task: str,
        fidelity: dict[str, float],
        retention: dict[str, float] | None = None,
        size_ratio: float | None = None,
        size_floor: float = 0.0,
    ) -> None:
        """Raise BuildGateError naming the first figure of ``task`` below its minimum (or not finite): fidelity,
        then the size ratio (against ``max_size_ratio`` or the graph's ``int8_floor``, whichever is higher), then
        each task's retention (a classifier's against ``top1_agreement``)."""
        for name, value in fidelity.items():
            if not math.isfinite(value):
                raise BuildGateError(model_id, name, value, 0.0, "finite, and >=")
        for metric in GATED[task]:
            minimum, value = getattr(self, metric), fidelity.get(metric)
            if minimum is not None and value is not None and value < minimum:
                raise BuildGateError(model_id, metric, value, minimum)
        if size_ratio is not None and self.max_size_ratio is not None:
            limit = round(max(self.max_size_ratio, size_floor) + SIZE_ALLOWANCE, 4)
            if size_ratio > limit:
                raise BuildGateError(model_id, "size_ratio_vs_fp32", size_ratio, limit, "<=")
        minimum = self.top1_agreement if task == "classify" else self.task_retention
        for name, kept in (retention or {}).items():
            if minimum is not None and kept < minimum:
                raise BuildGateError(model_id, f"task_retention[{name}]", kept, minimum)
