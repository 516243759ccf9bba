"""Errors the build pipeline raises."""

from __future__ import annotations


class BuildError(Exception):
    """The build cannot run: a missing input, a broken graph, a bad recipe name."""


class BuildGateError(BuildError):
    """A built model missed its fidelity gate; nothing was published.

    ``metric``, ``value`` and ``gate`` name the first check that failed.
    """

    def __init__(self, model_id: str, metric: str, value: float, gate: float, comparison: str = ">=") -> None:
        super().__init__(
            f"model {model_id} failed its fidelity gate: {metric} = {value:.6f}, gate requires {comparison} {gate}"
        )
        self.model_id = model_id
        self.metric = metric
        self.value = value
        self.gate = gate
