"""Batch fan-out, end to end: one 100,000-line job drained by 1, then 2 concurrent pollers -> bench/batch.json.

Each poller is a separate process running the real batch handler at one thread
(tests/integration/sqs_poller.py, what one Lambda execution environment does);
moto (a real process on 127.0.0.1) holds the queue, the input and the results.
The job is planned into shards, the pollers drain them, the last shard writes the
manifest. From the measured poller-seconds per line the script projects the wall
time and cost of 1M and 10M lines at concurrency 10, 100 and 1,000.

    PYTHONPATH=shared:. .venv/bin/python bench/batch_throughput.py [--lines 100000] [--shards 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT)]

from bench.measure import start_moto  # noqa: E402

MB_1_VCPU = 1769
USD_PER_GB_S = 0.0000166667  # Lambda x86_64, us-east-1
USD_PER_INVOCATION = 0.20 / 1e6
USD_PER_SQS_REQUEST = 0.40 / 1e6  # standard queue, after the free tier
USD_PER_S3_PUT = 0.005 / 1000  # PUT, LIST
USD_PER_S3_GET = 0.0004 / 1000  # GET, HEAD
LAMBDA_TIMEOUT_S = 900
SQS_SCALE_PER_MIN = 300  # Lambda adds up to about 300 concurrent SQS pollers a minute (AWS docs)
COLD_START_S = 0.6  # bench/REPORT.md, cold start of the batch function with the default model


def _client(name: str):
    import boto3

    return boto3.client(name)


def run_job(lines: int, pollers: int, shards: int, queue: tuple[str, str], size: int, logs: Path) -> dict:
    s3, sqs = _client("s3"), _client("sqs")
    url, arn = queue
    job_id = f"bench-{pollers}p"
    body = {"job_id": job_id, "model": "all-MiniLM-L6-v2", "task": "embed"}
    body |= {"input": {"s3_uri": "s3://bench-jobs/in/lines.jsonl"}, "output": "s3://bench-jobs/out/"}
    body["shard_bytes"] = max(1024, math.ceil(size / shards))
    env = os.environ | {"QUANTFN_THREADS": "1", "OMP_NUM_THREADS": "1", "POWERTOOLS_LOG_LEVEL": "ERROR"}
    started = time.perf_counter()
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))
    command = [sys.executable, "-m", "tests.integration.sqs_poller", "--queue-url", url, "--queue-arn", arn]
    command += ["--budget-ms", str(LAMBDA_TIMEOUT_S * 1000), "--idle-s", "2"]
    procs = []
    for i in range(pollers):
        with open(logs / f"{job_id}-{i}.log", "w") as log:  # the child keeps its copy of the file
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    key = f"out/{job_id}/manifest.json"
    while True:
        try:
            manifest = json.loads(s3.get_object(Bucket="bench-jobs", Key=key)["Body"].read())
            break
        except s3.exceptions.NoSuchKey:
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"a poller died; see {logs}") from None
            time.sleep(0.25)
    wall = time.perf_counter() - started
    for p in procs:
        p.wait(timeout=60)
    assert manifest["counts"] == {"lines": lines, "results": lines, "errors": 0}, manifest["counts"]
    markers = [
        json.loads(s3.get_object(Bucket="bench-jobs", Key=k["Key"])["Body"].read())
        for k in s3.list_objects_v2(Bucket="bench-jobs", Prefix=f"out/{job_id}/shards/")["Contents"]
    ]
    compute = sorted(m["compute_ms"] / 1000 for m in markers)
    return {
        "pollers": pollers,
        "threads_per_poller": 1,
        "lines": lines,
        "shards": len(markers),
        "wall_s": round(wall, 2),
        "lines_per_s": round(lines / wall, 1),
        "poller_s_per_line": wall * pollers / lines,
        "shard_compute_s": {"median": round(compute[len(compute) // 2], 2), "max": round(compute[-1], 2)},
        "shard_wall_s": round(wall * pollers / len(markers), 2),
        "invocations": manifest["timings"]["invocations"],
    }


def project(lines: int, concurrency: int, s_per_line: float, bytes_per_line: float, chunk_lines: int) -> dict:
    """Wall time and cost of ``lines`` at ``concurrency``: shards sized so each poller gets at least one."""
    size = lines * bytes_per_line
    default_shard = 4 * 2**20
    # whole waves: a multiple of the concurrency, at least the count the default shard size gives, at most 1000
    shards = min(1000, concurrency * math.ceil(math.ceil(size / default_shard) / concurrency))
    lines_per_shard = lines / shards
    shard_s = lines_per_shard * s_per_line
    waves = math.ceil(shards / concurrency)
    ramp_s = concurrency / SQS_SCALE_PER_MIN * 60  # pollers reach `concurrency` only after this long
    work_s = waves * shard_s
    wall = COLD_START_S + (work_s + ramp_s / 2 if work_s > ramp_s else math.sqrt(2 * work_s * ramp_s))
    invocations = shards * math.ceil(shard_s / (LAMBDA_TIMEOUT_S - 20)) + 1  # follow-ups past 15 min, the plan
    gb_s = (lines * s_per_line + min(concurrency, shards) * COLD_START_S) * MB_1_VCPU / 1024
    chunks = shards * math.ceil(lines_per_shard / chunk_lines)
    sqs_requests = math.ceil(shards / 10) + 2 * invocations  # SendMessageBatch; receive + delete per message
    s3_puts = 2 * chunks + 2 * shards + 3  # results + progress per chunk; marker + LIST per shard; plan, manifest
    s3_gets = 2 * chunks + 3 * shards + shards  # HEAD per chunk, GET per shard, marker checks; planner cuts
    usd = {
        "lambda_compute": gb_s * USD_PER_GB_S,
        "lambda_requests": invocations * USD_PER_INVOCATION,
        "sqs": sqs_requests * USD_PER_SQS_REQUEST,
        "s3": s3_puts * USD_PER_S3_PUT + s3_gets * USD_PER_S3_GET,
    }
    return {
        "lines": lines,
        "concurrency": concurrency,
        "shards": shards,
        "shard_s": round(shard_s, 1),
        "wall_s": round(wall, 1),
        "usd": {k: round(v, 4) for k, v in usd.items()} | {"total": round(sum(usd.values()), 4)},
        "requests": {"sqs": sqs_requests, "s3_put_list": s3_puts, "s3_get_head": s3_gets, "invocations": invocations},
    }


def batch_section(measured: dict) -> str:
    """The batch section of bench/REPORT.md, from bench/batch.json."""
    runs = [
        {
            "pollers": p,
            "lines": r["lines"],
            "shards": r["shards"],
            "wall s": r["wall_s"],
            "lines/s": r["lines_per_s"],
            "speed-up": measured["speedup"][p],
            "poller-s per shard": r["shard_wall_s"],
            "shard compute s (median / max)": f"{r['shard_compute_s']['median']} / {r['shard_compute_s']['max']}",
        }
        for p, r in measured["by_pollers"].items()
    ]
    projections = [
        {
            "lines": f"{p['lines']:,}",
            "concurrency": p["concurrency"],
            "shards": p["shards"],
            "shard s": p["shard_s"],
            "wall": f"{p['wall_s'] / 60:.1f} min",
            "Lambda $": round(p["usd"]["lambda_compute"] + p["usd"]["lambda_requests"], 4),
            "SQS $": p["usd"]["sqs"],
            "S3 $": p["usd"]["s3"],
            "total $": p["usd"]["total"],
        }
        for p in measured["projections"]
    ]
    host = measured["host"]
    assumptions = measured["projection_assumptions"]

    def table(rows: list[dict]) -> str:
        head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
        return head + "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n" for row in rows)

    return (
        "## Batch fan-out (bench/batch_throughput.py)\n\n"
        f"{measured['what']}. Host: {host['cpus']} cores shared with other work, load average "
        f"{host['loadavg_before'][0]} before and {host['loadavg_after'][0]} after (1-minute): the absolute "
        "speed is the host's, not Lambda's; the projection uses the measured poller-seconds per line.\n\n"
        f"{table(runs)}\n"
        f"Projection at {assumptions['memory_mb']} MB (1 vCPU), {assumptions['poller_s_per_line'] * 1000:.2f} ms "
        f"per line as measured with one poller; shards: {assumptions['shards']}; {assumptions['ramp']}; "
        f"{assumptions['prices']}.\n\n{table(projections)}"
    )


def write_report_section(measured: dict) -> None:
    """Replace the batch section of bench/REPORT.md (up to the next ## heading) with this run's."""
    report = ROOT / "bench" / "REPORT.md"
    text = report.read_text()
    start = next((text.index(h) for h in ("## Batch fan-out", "## Batch mode") if h in text), -1)
    if start < 0:
        return
    end = text.find("\n## ", start + 3)
    report.write_text(text[:start] + batch_section(measured) + (text[end:] if end >= 0 else ""))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--pollers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reproject", action="store_true", help="only redo the projection from bench/batch.json")
    args = parser.parse_args()
    if args.reproject:
        out = json.loads((ROOT / "bench" / "batch.json").read_text())
        out["projection_assumptions"]["shards"] = (
            "size / 4 MiB rounded up to whole waves of the concurrency, at most 1000"
        )
        base = out["by_pollers"][min(out["by_pollers"], key=int)]
        per_line = out["input_bytes"] / base["lines"]
        out["projections"] = [
            project(n, c, base["poller_s_per_line"], per_line, 1000)
            for n in (1_000_000, 10_000_000)
            for c in (10, 100, 1000)
        ]
        (ROOT / "bench" / "batch.json").write_text(json.dumps(out, indent=2) + "\n")
        write_report_section(out)
        return 0
    moto, url = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        QUANTFN_MODEL="layer:all-minilm-l6-v2",
        QUANTFN_MODELS_ROOT=os.environ.get("QUANTFN_MODELS_ROOT", str(ROOT / "build" / "models")),
        PYTHONPATH=f"{ROOT / 'shared'}:{ROOT}",
    )
    from quantfn.modelbuild.reference import load_corpus

    s3, sqs = _client("s3"), _client("sqs")
    s3.create_bucket(Bucket="bench-jobs")
    queue_url = sqs.create_queue(QueueName="bench-jobs", Attributes={"VisibilityTimeout": "5400"})["QueueUrl"]
    os.environ["QUANTFN_BATCH_QUEUE_URL"] = queue_url
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    corpus = load_corpus()
    body = (
        "\n".join(json.dumps({"id": i, "text": corpus[i % len(corpus)]}) for i in range(args.lines)) + "\n"
    ).encode()
    s3.put_object(Bucket="bench-jobs", Key="in/lines.jsonl", Body=body)
    logs = ROOT / "bench" / ".batch-logs"
    logs.mkdir(exist_ok=True)
    load_before = os.getloadavg()
    runs = {}
    try:
        for pollers in args.pollers:
            runs[pollers] = run_job(args.lines, pollers, args.shards, (queue_url, arn), len(body), logs)
            print(pollers, runs[pollers], flush=True)
    finally:
        moto.terminate()
    base = runs[min(runs)]
    speedups = {p: round(base["wall_s"] / r["wall_s"], 2) for p, r in runs.items()}
    s_per_line = base["poller_s_per_line"]
    projections = [
        project(n, c, s_per_line, len(body) / args.lines, 1000)
        for n in (1_000_000, 10_000_000)
        for c in (10, 100, 1000)
    ]
    out = {
        "what": f"one {args.lines}-line job ({len(body)} bytes) cut into {args.shards} shards, drained by 1 and 2 "
        "poller processes (real batch handler, 1 thread each), SQS and S3 in moto on loopback",
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "by_pollers": {str(p): r | {"poller_s_per_line": round(r["poller_s_per_line"], 6)} for p, r in runs.items()},
        "speedup": {str(p): s for p, s in speedups.items()},
        "projection_assumptions": {
            "poller_s_per_line": round(s_per_line, 6),
            "memory_mb": MB_1_VCPU,
            "shards": "size / 4 MiB rounded up to whole waves of the concurrency, at most 1000",
            "ramp": f"Lambda adds about {SQS_SCALE_PER_MIN} SQS pollers a minute",
            "cold_start_s": COLD_START_S,
            "prices": "us-east-1 list prices: Lambda $0.0000166667/GB-s and $0.20/M, SQS $0.40/M, "
            "S3 PUT/LIST $0.005/1000, GET/HEAD $0.0004/1000",
        },
        "projections": projections,
    }
    (ROOT / "bench" / "batch.json").write_text(json.dumps(out, indent=2) + "\n")
    write_report_section(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
