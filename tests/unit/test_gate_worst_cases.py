"""The gate looks at the worst cases: a recipe whose average is fine but that breaks a few texts fails it."""

from __future__ import annotations

import numpy as np
import pytest

from quantfn.modelbuild.errors import BuildGateError
from quantfn.modelbuild.evaluate import compare
from quantfn.modelbuild.gate import Gate


def _answers(broken: int, n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """fp32 vectors, and the same with small noise everywhere and ``broken`` of them pushed far off (a clipped
    fragment): cosine about 0.9995 for most, about 0.95 for the broken ones."""
    rng = np.random.default_rng(seed)
    want = rng.normal(size=(n, 64))
    got = want + 0.02 * np.linalg.norm(want, axis=1, keepdims=True) / 8 * rng.normal(size=want.shape)
    got[:broken] = want[:broken] + 0.33 * rng.normal(size=(broken, 64))
    return got, want


def test_given_one_clipped_text_in_a_thousand_when_gated_then_the_minimum_fails_though_the_mean_passes() -> None:
    got, want = _answers(broken=1)
    figures = compare("embed", got, want)
    assert figures["cosine_mean"] >= 0.998 and figures["cosine_p1"] >= 0.995  # an average-only gate passes it
    with pytest.raises(BuildGateError, match="cosine_min"):
        Gate().check("m", "embed", figures)


def test_given_two_percent_of_texts_broken_when_gated_then_the_first_percentile_fails() -> None:
    got, want = _answers(broken=20)
    figures = compare("embed", got, want)
    assert figures["cosine_p1"] < 0.995
    with pytest.raises(BuildGateError, match="cosine_p1"):
        Gate(cosine_mean=0.99, cosine_min=None).check("m", "embed", figures)


def test_given_every_text_close_when_gated_then_it_passes_and_the_figures_are_ordered() -> None:
    got, want = _answers(broken=0)
    figures = compare("embed", got, want)
    Gate().check("m", "embed", figures)
    assert figures["cosine_min"] <= figures["cosine_p1"] <= figures["cosine_mean"]
