"""The one gate every build passes, whatever its task: minimums on what ``evaluate`` measured.

A rung of the ladder is published only when each figure its task measures reaches
the gate (``Gate.check``): fidelity against the fp32 original on the fidelity corpus
(embed: cosine mean and minimum, recall@5 where asked, batch invariance; classify:
top-1 agreement; rerank: Spearman of the scores), the file size against fp32, and the
retention of every task-quality score (``quality``). Figures a task does not measure
are absent and so never checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    ) -> None:
        """Raise BuildGateError naming the first figure of ``task`` below its minimum: fidelity, then the
        size ratio, then each task's retention (a classifier's against ``top1_agreement``)."""
        for metric in GATED[task]:
            minimum, value = getattr(self, metric), fidelity.get(metric)
            if minimum is not None and value is not None and value < minimum:
                raise BuildGateError(model_id, metric, value, minimum)
        if size_ratio is not None and self.max_size_ratio is not None:
            limit = self.max_size_ratio + SIZE_ALLOWANCE
            if size_ratio > limit:
                raise BuildGateError(model_id, "size_ratio_vs_fp32", size_ratio, limit, "<=")
        minimum = self.top1_agreement if task == "classify" else self.task_retention
        for name, kept in (retention or {}).items():
            if minimum is not None and kept < minimum:
                raise BuildGateError(model_id, f"task_retention[{name}]", kept, minimum)
