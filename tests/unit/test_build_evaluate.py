"""The fidelity metrics on small arrays whose answers are known independently."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantfn.modelbuild.metrics import cosine_stats, recall_at_k, spearman_pairwise
from quantfn.modelbuild.vocab import prune_tokenizer, unreachable_ids


def test_cosine_stats_of_identical_arrays_is_one() -> None:
    x = np.random.default_rng(0).normal(size=(5, 8))
    mean, low = cosine_stats(x, x * 3.0)  # scale does not matter
    assert mean == pytest.approx(1.0) and low == pytest.approx(1.0)


def test_cosine_stats_known_angles() -> None:
    ref = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cand = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])  # cos 1, 1/sqrt2, 0
    mean, low = cosine_stats(cand, ref)
    assert mean == pytest.approx((1 + 2**-0.5 + 0) / 3)
    assert low == pytest.approx(0.0)


def test_cosine_stats_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        cosine_stats(np.ones((2, 3)), np.ones((3, 3)))


def test_spearman_is_one_for_a_rotation_and_low_for_unrelated_vectors() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 6))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert spearman_pairwise(x @ rotation, x) == pytest.approx(1.0)
    assert abs(spearman_pairwise(rng.normal(size=(40, 6)), rng.normal(size=(40, 6)))) < 0.2


def test_spearman_matches_a_hand_computed_value() -> None:
    # Three points give three pairwise cosines; ranks computed by hand.
    ref = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # sims: (0,1)=.8 (0,2)=0 (1,2)=.6 -> ranks 2,0,1
    cand = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # sims: (0,1)=0 (0,2)=.6 (1,2)=.8 -> ranks 0,1,2
    # Spearman of ranks (2,0,1) vs (0,1,2): d = (2,-1,-1), 1 - 6*6/(3*8) = -0.5
    assert spearman_pairwise(cand, ref) == pytest.approx(-0.5)


def test_recall_at_k_counts_neighbour_overlap_excluding_self() -> None:
    # Points on a line in angle: neighbours of each are its adjacent angles.
    t = np.array([0.0, 0.1, 0.2, 1.0, 1.1, 1.2])
    ref = np.stack([np.cos(t), np.sin(t)], axis=1)
    assert recall_at_k(ref, ref, k=2) == pytest.approx(1.0)
    moved = ref.copy()
    moved[0] = ref[4]  # point 0 now sits next to 3..5: its neighbours become {4, 3 or 5}
    got = recall_at_k(moved, ref, k=2)
    assert 0.0 < got < 1.0


def test_recall_at_k_exact_fraction() -> None:
    # 4 points; reference neighbours (k=1): 0<->1, 2<->3. Candidate pairs 0<->2 and 1<->3.
    ref = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.14, 0.99]])
    cand = np.array([[1.0, 0.0], [0.0, 1.0], [0.99, 0.14], [0.14, 0.99]])
    assert recall_at_k(cand, ref, k=1) == pytest.approx(0.0)
    assert recall_at_k(ref, ref, k=1) == pytest.approx(1.0)


def test_vocab_pruning_renumbers_consistently() -> None:
    from tokenizers import Tokenizer

    from quantfn.modelbuild.source import locate_source

    data = json.loads(locate_source().tokenizer.read_text(encoding="utf-8"))
    drop = unreachable_ids(data)
    assert len(drop) == 994
    pruned, keep = prune_tokenizer(data, drop)
    old, new = Tokenizer.from_str(json.dumps(data)), Tokenizer.from_str(json.dumps(pruned))
    text = "Hello [unused3] world, naïve café ## [MASK] 12345!"
    old_ids, new_ids = old.encode(text).ids, new.encode(text).ids
    assert keep[new_ids].tolist() == old_ids
    assert not set(old_ids) & set(drop)
