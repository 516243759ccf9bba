"""The GPU container's pure parts: which model and providers it picks, and its bounded batching queue."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from quantfn.config import ConfigError, RuntimeSettings, ServerSettings, Settings
from quantfn.tasks import Encoded
from tests.conftest import load_gpu_server

server = load_gpu_server()
CUDA_ORT = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def encoded(*ids: list[int]) -> Encoded:
    """One request's encodings: token ids per input, type ids all 0."""
    return Encoded([list(seq) for seq in ids], [[0] * len(seq) for seq in ids])


def models(tmp_path: Path, *ids: str) -> Settings:
    for model_id in ids:
        (tmp_path / model_id).mkdir()
        (tmp_path / model_id / "manifest.json").write_text("{}")
    return Settings(runtime=RuntimeSettings(models_root=tmp_path))


def test_on_a_gpu_the_fp16_variant_runs_on_cuda(tmp_path: Path) -> None:
    choice = server.choose_model(models(tmp_path, "all-minilm-l6-v2", "all-minilm-l6-v2-fp16"), CUDA_ORT)
    assert (
        choice.models == (("all-minilm-l6-v2", "layer:all-minilm-l6-v2-fp16"),)
        and choice.providers[0] == "CUDAExecutionProvider"
    )


def test_on_a_gpu_without_the_fp16_variant_the_default_model_runs_on_cuda(tmp_path: Path) -> None:
    choice = server.choose_model(models(tmp_path, "all-minilm-l6-v2"), CUDA_ORT)
    assert (
        choice.models == (("all-minilm-l6-v2", "layer:all-minilm-l6-v2"),)
        and choice.providers[0] == "CUDAExecutionProvider"
    )
    assert "no layer:all-minilm-l6-v2-fp16" in choice.reason


def test_without_cuda_the_default_model_runs_on_cpu(tmp_path: Path) -> None:
    settings = models(tmp_path, "all-minilm-l6-v2", "all-minilm-l6-v2-fp16")
    choice = server.choose_model(settings, ["CPUExecutionProvider"])
    assert choice.models == (("all-minilm-l6-v2", "layer:all-minilm-l6-v2"),) and choice.providers == (
        "CPUExecutionProvider",
    )
    forced = server.choose_model(
        Settings(runtime=RuntimeSettings(models_root=tmp_path), server=ServerSettings(gpu_provider="cpu")), CUDA_ORT
    )
    assert forced.providers == ("CPUExecutionProvider",) and "QUANTFN_GPU_PROVIDER=cpu" in forced.reason


def test_demanding_cuda_where_there_is_none_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        server.choose_model(Settings(server=ServerSettings(gpu_provider="cuda")), ["CPUExecutionProvider"])


def wait_until(condition, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_a_full_queue_answers_busy_at_once_and_the_rest_complete() -> None:
    # Given an encoder held busy and a queue of one
    release, encoding = threading.Event(), threading.Event()

    def forward(tokens: Encoded) -> np.ndarray:
        encoding.set()
        release.wait(5)
        return np.ones((len(tokens.ids), 2), np.float32)

    batcher = server.MicroBatcher(forward, wait_s=0.0, max_texts=8, queue_max=1)
    results: list[np.ndarray] = []
    running = threading.Thread(target=lambda: results.append(batcher.submit(encoded([1, 2]))))
    running.start()
    assert encoding.wait(5)  # the worker took the first job and is encoding it
    waiting = threading.Thread(target=lambda: results.append(batcher.submit(encoded([3]))))
    waiting.start()
    wait_until(lambda: batcher.snapshot()["queued"] == 1)
    # When a third request comes
    with pytest.raises(server.ServerBusy) as busy:
        batcher.submit(encoded([4]))
    # Then it is refused with 503, and the two others still get their answers
    assert busy.value.status == 503 and batcher.snapshot()["rejected_busy"] == 1
    release.set()
    running.join(5)
    waiting.join(5)
    assert [r.shape for r in results] == [(1, 2), (1, 2)]


def test_a_failing_batch_fails_every_request_in_it() -> None:
    def forward(tokens: Encoded) -> np.ndarray:
        raise RuntimeError("device lost")

    batcher = server.MicroBatcher(forward, wait_s=0.0, max_texts=8, queue_max=4)
    with pytest.raises(RuntimeError, match="device lost"):
        batcher.submit(encoded([1]))
