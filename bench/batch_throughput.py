"""Batch mode, end to end: one SQS job of 10,000 JSON lines through the real batch handler -> bench/batch.json.

moto (a real process on 127.0.0.1) holds the input and the results; the handler streams the file,
embeds it in chunks and writes results as it would in Lambda. Threads = vCPUs, 1 and 2.

    PYTHONPATH=shared:. .venv/bin/python bench/batch_throughput.py [--lines 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT)]

from bench.measure import start_moto  # noqa: E402

USD_PER_GB_S = 0.0000166667


class Context:
    function_name, memory_limit_in_mb, aws_request_id = "bench-batch", 1769, "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench-batch"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000)
    args = parser.parse_args()
    moto, url = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        QUANTFN_MODEL="layer:all-minilm-l6-v2",
        QUANTFN_MODELS_ROOT=str(ROOT / "build" / "models"),
        POWERTOOLS_LOG_LEVEL="ERROR",
        QUANTFN_BATCH_QUEUE_URL=f"{url}/123456789012/unused",
    )
    import boto3

    from quantfn.build.reference import load_corpus

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench-jobs")
    corpus = load_corpus()
    body = "\n".join(json.dumps({"id": i, "text": corpus[i % len(corpus)]}) for i in range(args.lines)) + "\n"
    s3.put_object(Bucket="bench-jobs", Key="in/lines.jsonl", Body=body.encode())
    results = {}
    try:
        for threads in (1, 2):
            os.environ["QUANTFN_THREADS"] = str(threads)
            from functions.batch import app
            from quantfn.service import reset_service

            reset_service()
            app.get_runner.cache_clear()
            app.get_service().model()  # a warm environment: the model load is measured elsewhere
            job = {
                "job_id": f"bench-{threads}",
                "model": "all-MiniLM-L6-v2",
                "task": "embedding",
                "input": {"s3_uri": "s3://bench-jobs/in/lines.jsonl"},
                "output": "s3://bench-jobs/out/",
            }
            event = {
                "Records": [
                    {
                        "messageId": f"m{threads}",
                        "receiptHandle": "r",
                        "body": json.dumps(job),
                        "attributes": {"ApproximateReceiveCount": "1"},
                        "messageAttributes": {},
                        "md5OfBody": "",
                        "eventSource": "aws:sqs",
                        "awsRegion": "us-east-1",
                        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:jobs",
                    }
                ]
            }
            started = time.perf_counter()
            with open(os.devnull, "w") as sink:
                saved, sys.stdout = sys.stdout, sink
                try:
                    reply = app.lambda_handler(event, Context())
                finally:
                    sys.stdout = saved
            seconds = time.perf_counter() - started
            assert reply["batchItemFailures"] == [], reply
            manifest = json.loads(
                s3.get_object(Bucket="bench-jobs", Key=f"out/bench-{threads}/manifest.json")["Body"].read()
            )
            assert manifest["counts"]["results"] == args.lines, manifest["counts"]
            per_s = args.lines / seconds
            memory_gb = 1769 / 1024 * threads
            results[threads] = {
                "lines": args.lines,
                "seconds": round(seconds, 2),
                "embeddings_per_s": round(per_s, 1),
                "embeddings_per_s_per_vcpu": round(per_s / threads, 1),
                "usd_per_million_embeddings": round(1e6 / per_s * memory_gb * USD_PER_GB_S, 4),
                "memory_mb": 1769 * threads,
            }
            print(threads, results[threads], flush=True)
    finally:
        moto.terminate()
    out = {
        "what": f"one SQS job of {args.lines} JSON lines, real batch handler, S3 in/out via moto on loopback",
        "by_threads": results,
    }
    (ROOT / "bench" / "batch.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
