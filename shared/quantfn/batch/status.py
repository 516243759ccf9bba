"""A job's status from its control objects: shards done of total, lines, results, errors, and what is stuck.

Nothing writes a status object; this reads the listing (job.json, the shard
markers, progress and failure records, the manifest) so status can never
disagree with what the shards really wrote.
"""

from __future__ import annotations

from typing import Any

from quantfn.batch import shards as store


def job_status(s3: Any, bucket: str, prefix: str) -> dict[str, Any]:
    """``state``: not_found, planning, running, incomplete (a shard dead-lettered), failed or complete."""
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    record = store.read_json(s3, bucket, prefix + "job.json")
    manifest = store.read_json(s3, bucket, prefix + "manifest.json")
    if record is None:
        return {"state": "complete" if manifest else "not_found", "prefix": f"s3://{bucket}/{prefix}"}
    total = len(record["shards"])
    done = store.read_markers(s3, bucket, prefix)
    counts = {name: sum(m[name] for m in done.values()) for name in ("lines", "results", "errors")}
    starts = {s["index"]: s["start"] for s in record["shards"]}
    bytes_done = sum(m["end"] - m["start"] for m in done.values())
    running = []
    for key in store.list_keys(s3, bucket, prefix + "progress/"):
        index = store.index_of(key)
        progress = store.read_json(s3, bucket, key) if index not in done else None
        if progress:
            running.append(index)
            bytes_done += progress["offset"] - starts.get(index, progress["offset"])
            for name, field in (("lines", "line"), ("results", "results"), ("errors", "errors")):
                counts[name] += progress[field]
    dead = []
    for key in store.list_keys(s3, bucket, prefix + "failed/shard-"):
        if store.index_of(key) not in done:
            dead.append(store.read_json(s3, bucket, key) or {"shard": store.index_of(key)})
    failed = store.read_json(s3, bucket, prefix + "failed/input.json")
    if manifest:
        state = "complete"
    elif failed:
        state = "failed"
    elif dead:
        state = "incomplete"
    else:
        state = "running" if done or running else "planning"
    status = {
        "job_id": record["job_id"],
        "state": state,
        "input": record["input"],
        "shards": {"total": total, "done": len(done), "running": sorted(running), "dead_lettered": dead},
        "counts": manifest["counts"] if manifest else counts,
        "input_size": record.get("size"),
        "bytes_done": bytes_done,
        "created_at": record.get("created_at"),
    }
    if failed:
        status["error"] = failed
    if manifest:
        status["finished_at"] = manifest.get("finished_at")
    return status
