"""template.yaml, the batch part: bounded fan-out and timings that agree with each other and the settings."""

from __future__ import annotations

from tests.integration.test_template import template  # noqa: F401  (the parsed template, a fixture)


def test_the_event_source_mapping_bounds_concurrency_by_a_parameter(template) -> None:  # noqa: F811
    (event,) = template["Resources"]["BatchFunction"]["Properties"]["Events"].values()
    assert event["Properties"]["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "BatchMaxConcurrency"}}
    parameter = template["Parameters"]["BatchMaxConcurrency"]
    assert (parameter["MinValue"], parameter["MaxValue"]) == (2, 1000)  # what Lambda accepts


def test_shard_settings_and_receive_count_come_from_the_parameters_the_queue_uses(template) -> None:  # noqa: F811
    resources = template["Resources"]
    env = resources["BatchFunction"]["Properties"]["Environment"]["Variables"]
    assert env["QUANTFN_BATCH_SHARD_BYTES"] == env["QUANTFN_BATCH_SHARD_THRESHOLD_BYTES"] == {"Ref": "BatchShardBytes"}
    redrive = resources["JobQueue"]["Properties"]["RedrivePolicy"]
    assert env["QUANTFN_BATCH_MAX_RECEIVES"] == redrive["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}
    timeout = resources["BatchFunction"]["Properties"]["Timeout"]
    assert resources["JobQueue"]["Properties"]["VisibilityTimeout"] >= 6 * timeout
    assert timeout * 1000 > 20_000  # QUANTFN_BATCH_SAFETY_MS's default, plus a chunk


def test_shards_may_read_the_version_the_planner_recorded(template) -> None:  # noqa: F811
    statements = [
        s
        for p in template["Resources"]["BatchFunctionRole"]["Properties"]["Policies"]
        for s in p["PolicyDocument"]["Statement"]
    ]
    assert any("s3:GetObjectVersion" in s["Action"] for s in statements if isinstance(s["Action"], list))
