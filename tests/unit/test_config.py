from __future__ import annotations

import pytest

from quantfn.config import ConfigError, RuntimeSettings, Settings, available_vcpus, variables


def test_defaults_apply_when_the_environment_is_empty() -> None:
    settings = Settings.from_env({})
    assert settings.runtime.model == "layer:all-minilm-l6-v2"
    assert str(settings.runtime.models_root) == "/opt/models"
    assert settings.limits.max_inputs == 256
    assert settings.runtime.threads >= 1


def test_every_variable_is_read() -> None:
    env = {
        "QUANTFN_MODEL": "s3://bucket-a/models/m1/",
        "QUANTFN_MODELS_ROOT": "/x/models",
        "QUANTFN_CACHE_DIR": "/x/cache",
        "QUANTFN_CACHE_MAX_MB": "100",
        "QUANTFN_THREADS": "3",
        "QUANTFN_BATCH_SIZE": "8",
        "QUANTFN_MAX_INPUTS": "10",
        "QUANTFN_MAX_INPUT_TOKENS": "300",
        "QUANTFN_MAX_TOTAL_TOKENS": "1000",
        "QUANTFN_MAX_BODY_BYTES": "2048",
        "QUANTFN_MODEL_ALIASES": "a, b ,",
        "QUANTFN_PRELOAD": "true",
    }
    s = Settings.from_env(env)
    assert (s.runtime.model, str(s.runtime.models_root), str(s.runtime.cache_dir)) == (
        "s3://bucket-a/models/m1/",
        "/x/models",
        "/x/cache",
    )
    assert (s.runtime.cache_max_bytes, s.runtime.threads, s.runtime.batch_size) == (100 * 2**20, 3, 8)
    assert (s.limits.max_inputs, s.limits.max_input_tokens, s.limits.max_total_tokens, s.limits.max_body_bytes) == (
        10,
        300,
        1000,
        2048,
    )
    assert s.runtime.model_aliases == ("a", "b")
    assert s.runtime.preload is True


@pytest.mark.parametrize(
    ("name", "value"),
    [("QUANTFN_MAX_INPUTS", "many"), ("QUANTFN_MAX_INPUTS", "0"), ("QUANTFN_PRELOAD", "perhaps")],
)
def test_bad_values_are_refused_with_the_variable_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_the_default_model_is_the_first_of_models() -> None:
    assert Settings(runtime=RuntimeSettings(models=(("m", "layer:m"), ("n", "layer:n")))).runtime.model == "layer:m"
    assert Settings.from_env({"QUANTFN_MODELS": "b=layer:b,a=layer:a"}).runtime.model == "layer:b"


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.limits.max_inputs = 1  # type: ignore[misc]


@pytest.mark.parametrize(("memory", "expected_at_most"), [("512", 1), ("1769", 1), ("1770", 2), ("10240", 6)])
def test_vcpus_follow_lambda_memory_share(memory: str, expected_at_most: int) -> None:
    vcpus = available_vcpus({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": memory})
    assert 1 <= vcpus <= expected_at_most


def test_every_variable_quantfn_reads_is_documented_in_the_readme() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    read = set(variables())
    documented = set(re.findall(r"QUANTFN_[A-Z0-9_]+", (root / "README.md").read_text()))
    assert len(read) > 50 and read <= documented, sorted(read - documented)
