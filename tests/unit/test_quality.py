"""The task-quality suite: data read from wheels, scores, retention, the gate, the eval table.

The wheels here are made by the tests (same paths inside as the real ones, tiny synthetic data),
so nothing is downloaded: ``fetch_wheel`` finds them in the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantfn.modelbuild import BuildGateError, Gate
from quantfn.modelbuild import quality as q
from tests.quality_data import make_wheels


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    upper = np.triu(rng.random((5, 5)), k=1) + np.eye(5)
    reviews = [("fresh", f"great film {i}") for i in range(6)] + [("rotten", f"dull film {i}") for i in range(6)]
    reviews.append(("plot", "a man robs a bank"))
    make_wheels(tmp_path, [f"doc {i} café" for i in range(5)], upper, reviews)
    return tmp_path


def test_given_cached_wheels_when_loading_lee_then_upper_triangle_pairs_and_latin1_text(cache: Path) -> None:
    lee = q.load_lee(cache)
    assert lee.documents[0] == "doc 0 café"
    assert lee.pairs.shape == (10, 2) and (lee.pairs[:, 0] < lee.pairs[:, 1]).all()
    assert len(lee.ratings) == 10


def test_given_cached_wheels_when_loading_rotten_tomatoes_then_plots_are_left_out_and_classes_balanced(
    cache: Path,
) -> None:
    data = q.load_rotten_tomatoes(cache, per_class=4)
    assert len(data.texts) == 8 and sorted(np.bincount(data.labels)) == [4, 4]
    assert all("bank" not in text for text in data.texts)
    assert data.texts == q.load_rotten_tomatoes(cache, per_class=4).texts  # fixed seed


def test_given_ratings_ranked_like_the_cosines_when_scoring_lee_then_spearman_is_one_and_reversed_minus_one() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(6, 4))
    i, j = np.triu_indices(6, k=1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = (unit[i] * unit[j]).sum(axis=1)
    pairs = np.stack([i, j], axis=1)
    assert q.score_lee(vectors, q.Lee([""] * 6, pairs, np.exp(cosine))) == pytest.approx(1.0)
    assert q.score_lee(vectors, q.Lee([""] * 6, pairs, -cosine)) == pytest.approx(-1.0)


def test_given_separable_and_random_labels_when_probing_then_accuracy_tells_them_apart() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 50)
    separable = rng.normal(size=(100, 8)) + labels[:, None] * 4.0
    assert q.probe_accuracy(separable, labels) == 1.0
    assert q.probe_accuracy(rng.normal(size=(100, 8)), labels) < 0.8


def test_given_a_task_below_its_retention_gate_when_checked_then_the_error_names_the_task() -> None:
    quality = q.Quality(
        scores={"lee": 0.50, "rotten_tomatoes": 0.75},
        fp32_scores={"lee": 0.51, "rotten_tomatoes": 0.75},
        fidelity={"cosine_mean": 0.999, "cosine_min": 0.995},
    )
    with pytest.raises(BuildGateError, match=r"task_retention\[lee\]"):
        Gate().check("m", "embed", quality.fidelity, quality.retention)
    Gate(task_retention=0.98).check("m", "embed", quality.fidelity, quality.retention)
    assert quality.retention_min == pytest.approx(0.50 / 0.51)
    assert quality.as_dict()["tasks"]["rotten_tomatoes"]["retention"] == 1.0


def test_given_low_cosine_min_when_checked_then_the_gate_fails_on_it() -> None:
    quality = q.Quality({"lee": 1.0}, {"lee": 1.0}, {"cosine_mean": 0.999, "cosine_min": 0.98})
    with pytest.raises(BuildGateError, match="cosine_min"):
        Gate().check("m", "embed", quality.fidelity, quality.retention)


def test_given_no_wheel_and_no_index_when_fetching_then_a_build_error_says_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quantfn.modelbuild import BuildError

    # pip pointed at a closed port on loopback: the download fails without leaving this machine.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(BuildError, match=r"gensim==4\.4\.0"):
        q.fetch_wheel("gensim==4.4.0", tmp_path)
