"""How a pipeline spends its threads (``open_pipeline``'s ``parallelism``), on the built default model.

Under ``auto`` one text runs on the every-thread session and a batch runs in pieces, at once, on a second
session of one thread: the same text must get the same vector on either path, every row must come back
in request order, and concurrent callers (the GPU container's server threads) must not mix rows.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from quantfn.config import ConfigError, Settings
from quantfn.modelbuild.reference import load_corpus
from quantfn.models.manifest import Manifest
from quantfn.tasks import Pipeline, open_pipeline


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_corpus()[:70]  # 70 mixed-length texts: three sub-batches of 32, the last one short


def _open(model_dir: Path, parallelism: str, threads: int = 2, batch_size: int = 32) -> Pipeline:
    return open_pipeline(model_dir, Manifest.read(model_dir), threads, batch_size, parallelism=parallelism)


def _intra_op_threads(session: object) -> int:
    return session.get_session_options().intra_op_num_threads  # type: ignore[attr-defined]


def test_auto_runs_one_text_on_every_thread_and_batches_in_pieces_on_one(model_dir: Path, texts: list[str]) -> None:
    pipeline = _open(model_dir, "auto")
    assert _intra_op_threads(pipeline.session) == 2 and pipeline.workers == 2
    alone = np.concatenate([pipeline.embed([text]) for text in texts])
    assert pipeline.piece_session is None  # single texts never open the second session
    together = pipeline.embed(texts)
    assert pipeline.piece_session is not None and pipeline.piece_session is not pipeline.session
    assert _intra_op_threads(pipeline.piece_session) == 1
    # the same text, alone on one session or inside a piece of a batch on the other: the gate's invariance
    assert float((alone * together).sum(axis=1).min()) >= 0.9999


@pytest.mark.parametrize("parallelism", ["data", "intra"])
def test_every_parallelism_gives_the_same_rows_in_request_order(
    model_dir: Path, texts: list[str], parallelism: str
) -> None:
    expected = _open(model_dir, "intra", threads=1).embed(texts)
    pipeline = _open(model_dir, parallelism)
    got = pipeline.embed(texts)
    assert got.shape == expected.shape
    assert float((got * expected).sum(axis=1).min()) >= 0.9999
    if parallelism == "data":
        assert _intra_op_threads(pipeline.session) == 1 and pipeline.piece_session is pipeline.session
        assert pipeline.workers == 2
    else:
        assert _intra_op_threads(pipeline.session) == 2 and pipeline.workers == 1


def test_one_thread_never_opens_a_second_session(model_dir: Path, texts: list[str]) -> None:
    pipeline = _open(model_dir, "auto", threads=1)
    pipeline.embed(texts)
    assert pipeline.workers == 1 and pipeline.piece_session is pipeline.session


def test_pieces_cover_odd_sizes_and_small_batch_sizes(model_dir: Path, texts: list[str]) -> None:
    expected = _open(model_dir, "intra", threads=1).embed(texts)
    pipeline = _open(model_dir, "auto", threads=3, batch_size=5)  # pieces of 2: 35 of them on 3 workers
    for count in (2, 3, 7, 70):
        got = pipeline.embed(texts[:count])
        assert float((got * expected[:count]).sum(axis=1).min()) >= 0.9999, count
    assert pipeline.embed([]).shape == (0, expected.shape[1])


def test_concurrent_callers_get_their_own_rows(model_dir: Path, texts: list[str]) -> None:
    pipeline = _open(model_dir, "auto")
    expected = pipeline.embed(texts)
    requests = [texts[i : i + 9] for i in range(0, 63, 9)]
    got: dict[int, np.ndarray] = {}

    def call(index: int) -> None:
        got[index] = pipeline.embed(requests[index])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, request in enumerate(requests):
        rows = expected[index * 9 : index * 9 + len(request)]
        assert float((got[index] * rows).sum(axis=1).min()) >= 0.9999, index


def test_parallelism_setting_is_checked(model_dir: Path) -> None:
    assert Settings.from_env({}).runtime.parallelism == "auto"
    assert Settings.from_env({"QUANTFN_PARALLELISM": " Data "}).runtime.parallelism == "data"
    with pytest.raises(ConfigError, match="QUANTFN_PARALLELISM must be one of auto, data, intra"):
        Settings.from_env({"QUANTFN_PARALLELISM": "threads"})
    with pytest.raises(ValueError, match="parallelism must be one of"):
        _open(model_dir, "fast")
