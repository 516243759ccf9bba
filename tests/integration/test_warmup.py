"""The init phase loads the model only when asked to (QUANTFN_PRELOAD) or under SnapStart."""

from __future__ import annotations

import pytest

from quantfn.registry import get_registry
from quantfn.warmup import prepare_init

pytestmark = pytest.mark.usefixtures("service_env")


def test_by_default_init_loads_nothing() -> None:
    assert prepare_init() is False
    assert not get_registry().default.loaded


def test_preload_loads_the_model_during_init(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantfn.registry import reset_registry

    monkeypatch.setenv("QUANTFN_PRELOAD", "true")
    reset_registry()
    assert prepare_init() is True
    registry = get_registry()
    assert registry.default.loaded and registry.load_ms(registry.default) > 0


def test_snapstart_init_loads_the_model_before_the_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    assert prepare_init() is True
    assert get_registry().default.loaded


def test_init_opens_the_batch_piece_session_too_on_two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantfn.registry import reset_registry

    monkeypatch.setenv("QUANTFN_PRELOAD", "true")
    monkeypatch.setenv("QUANTFN_THREADS", "2")
    reset_registry()
    assert prepare_init() is True
    registry = get_registry()
    pipeline = registry.pipeline(registry.default)
    assert pipeline.workers == 2
    assert pipeline.piece_session is not None and pipeline.piece_session is not pipeline.session
