"""Post-processing and truncation, checked against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantfn.modelbuild.source import locate_source
from quantfn.models.manifest import Manifest
from quantfn.tasks import EmbedPipeline, load_tokenizer
from quantfn.tasks.embed import mean_pool


def embed_manifest(max_length: int = 16, normalize: bool = True) -> Manifest:
    return Manifest(
        model_id="t",
        task="embed",
        files={},
        dimensions=4,
        max_sequence_length=max_length,
        inputs=("input_ids", "attention_mask"),
        output="last_hidden_state",
        normalize=normalize,
    )


def test_mean_pool_averages_only_unmasked_positions_and_normalises() -> None:
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    pooled = EmbedPipeline(session=None, tokenizer=None, manifest=embed_manifest()).postprocess(hidden, mask)
    assert pooled.dtype == np.float32
    for row in range(3):
        expected = hidden[row, : mask[row].sum()].mean(axis=0)
        expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(pooled[row], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-6)


def test_padding_values_do_not_leak_into_the_mean() -> None:
    hidden = np.ones((1, 4, 2), dtype=np.float32)
    hidden[0, 2:] = 1e6  # padding positions hold garbage
    pooled = mean_pool(hidden, np.array([[1, 1, 0, 0]]))
    np.testing.assert_allclose(pooled, [[1.0, 1.0]])


@pytest.fixture(scope="module")
def tokenizer_file() -> Path:
    return locate_source().tokenizer


def test_truncation_matches_the_tokenizers_own(tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    ours = load_tokenizer(tokenizer_file)
    reference = Tokenizer.from_file(str(tokenizer_file))
    reference.no_padding()
    reference.enable_truncation(max_length=16)
    model = EmbedPipeline(session=None, tokenizer=ours, manifest=embed_manifest(max_length=16))
    text = "a long sentence " * 20
    tokens = model.encode([text, "short one"])
    assert tokens.counts[0] > 16  # counts are untruncated: they are what limits and usage report
    ids, type_ids = model._truncated(tokens)
    assert ids[0] == reference.encode(text).ids
    assert ids[1] == reference.encode("short one").ids
    assert type_ids[0] == reference.encode(text).type_ids


def test_the_shipped_tokenizer_file_forces_128_but_ours_does_not(tokenizer_file: Path) -> None:
    shipped = json.loads(tokenizer_file.read_text())
    assert shipped["truncation"]["max_length"] == 128  # why load_tokenizer turns both off
    tokenizer = load_tokenizer(tokenizer_file)
    assert len(tokenizer.encode("word " * 300).ids) == 302
