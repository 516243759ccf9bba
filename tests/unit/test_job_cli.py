from __future__ import annotations

from quantfn.batch.cli import progress_line


def test_given_a_running_job_then_the_bar_shows_bytes_done_and_shards_done_of_total() -> None:
    status = {
        "state": "running",
        "input_size": 1000,
        "bytes_done": 250,
        "shards": {"done": 1, "total": 4, "running": [1], "dead_lettered": []},
        "counts": {"lines": 1200, "results": 1190, "errors": 10},
    }
    line = progress_line(status, width=20)
    assert line.startswith("[#####...............]  25.0%  shards 1/4")
    assert "lines 1,200  results 1,190  errors 10  running" in line


def test_given_a_dead_lettered_shard_then_the_status_names_it() -> None:
    status = {
        "state": "incomplete",
        "input_size": 10,
        "bytes_done": 5,
        "shards": {"done": 3, "total": 4, "running": [], "dead_lettered": [{"shard": 2, "message": "in the DLQ"}]},
        "counts": {"lines": 5, "results": 5, "errors": 0},
    }
    assert "shard 2 dead-lettered: in the DLQ" in progress_line(status)
