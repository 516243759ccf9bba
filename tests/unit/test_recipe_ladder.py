"""``default`` publishes the first recipe of its ladder that passes the gate, and says what it rejected."""

from __future__ import annotations

import pytest

from quantfn.modelbuild import BuildError, BuildGateError
from quantfn.modelbuild.pipeline import first_passing as _first_passing
from quantfn.modelbuild.recipes import DEFAULT_LADDER, RECIPES, recipe_ladder


def test_default_tries_w7a8_static_per_token_cascade_steady_then_weight_only_and_a_name_tries_itself() -> None:
    ladder = ("int8-static", "int8-token7", "int8-cascade", "int8-steady", "int8-weight", "fp32")
    assert recipe_ladder("default") == DEFAULT_LADDER == ladder
    assert all(name in RECIPES for name in DEFAULT_LADDER) and "default" not in RECIPES
    assert recipe_ladder("int8-token") == ("int8-token",)
    with pytest.raises(BuildError, match=r"unknown recipe 'int9'.*default"):
        recipe_ladder("int9")


def _builder(fails: set[str], calls: list[tuple[str, object]]):
    def build(rung: str, rejected):
        calls.append((rung, None if rejected is None else list(rejected)))
        if rung in fails:
            raise BuildGateError("m", "top1_agreement", 0.983333, 0.99)
        return {"recipe": rung, "rejected": rejected}

    return build


def test_a_rung_that_misses_its_gate_is_recorded_and_the_next_one_is_built() -> None:
    calls: list[tuple[str, object]] = []
    said: list[str] = []
    misses = {"int8-static", "int8-token7", "int8-cascade", "int8-steady"}
    result = _first_passing("default", _builder(misses, calls), said.append)
    assert result["recipe"] == "int8-weight"
    assert result["rejected"] == [
        {"recipe": "int8-static", "metric": "top1_agreement", "value": 0.983333},
        {"recipe": "int8-token7", "metric": "top1_agreement", "value": 0.983333},
        {"recipe": "int8-cascade", "metric": "top1_agreement", "value": 0.983333},
        {"recipe": "int8-steady", "metric": "top1_agreement", "value": 0.983333},
    ]
    assert [rung for rung, _ in calls] == ["int8-static", "int8-token7", "int8-cascade", "int8-steady", "int8-weight"]
    assert said == [
        "int8-static missed the gate (top1_agreement 0.983333); trying int8-token7",
        "int8-token7 missed the gate (top1_agreement 0.983333); trying int8-cascade",
        "int8-cascade missed the gate (top1_agreement 0.983333); trying int8-steady",
        "int8-steady missed the gate (top1_agreement 0.983333); trying int8-weight",
    ]


def test_the_first_passing_rung_wins_and_a_named_recipe_records_no_choice() -> None:
    calls: list[tuple[str, object]] = []
    assert _first_passing("default", _builder(set(), calls), None) == {"recipe": "int8-static", "rejected": []}
    assert _first_passing("default", _builder({"int8-static"}, calls), None)["recipe"] == "int8-token7"
    assert _first_passing("int8-token", _builder(set(), calls), None)["rejected"] is None


def test_when_every_rung_misses_the_last_failure_is_raised() -> None:
    with pytest.raises(BuildGateError, match="top1_agreement"):
        _first_passing("default", _builder(set(DEFAULT_LADDER), []), None)
    with pytest.raises(BuildGateError):
        _first_passing("int8-token7", _builder({"int8-token7"}, []), None)


def test_given_a_ladder_that_passed_over_rungs_when_the_build_reports_then_each_says_why() -> None:
    from pathlib import Path

    from quantfn.cli import built_summary

    manifest = {
        "model_id": "m",
        "quantization": {
            "recipe": "int8-weight",
            "rejected": [
                {"recipe": "int8-static", "metric": "cosine_mean", "value": 0.9979},
                {"recipe": "int8-cascade", "cannot_apply": "int8-cascade serves classifiers only"},
            ],
        },
        "fidelity": {"cosine_mean": 0.9998, "reference": "fp32"},
        "deploy": {"model_bytes": 2**20, "fits": "layer"},
        "size_ratio_vs_fp32": 0.251,
    }
    lines = built_summary(manifest, Path("out"))
    assert lines[0] == "built m (int8-weight): 1.0 MB, 0.251 of fp32, fits layer; cosine_mean 0.9998 -> out/m"
    assert lines[1:] == [
        "  int8-static missed the gate: cosine_mean 0.9979",
        "  int8-cascade cannot apply: int8-cascade serves classifiers only",
    ]
