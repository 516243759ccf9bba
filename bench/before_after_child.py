"""One fresh process of one quantfn version: cold start to the first answer, then warm batch-32 passes.

    PYTHONPATH=<checkout>/shared:<checkout> python bench/before_after_child.py <checkout> <passes>

Prints one JSON line. Only the API handler and events/ are touched, so it runs any version of quantfn.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


class Context:
    function_name, memory_limit_in_mb, aws_request_id = "bench", 2048, "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"

    def get_remaining_time_in_millis(self) -> int:
        return 29_000


def main() -> None:
    checkout, passes = sys.argv[1], int(sys.argv[2])
    from functions.api.app import lambda_handler

    with open(os.path.join(checkout, "events", "api-embeddings.json")) as handle:
        event = json.load(handle)
    event["body"] = json.dumps({"model": "all-MiniLM-L6-v2", "input": "How long does a cold start take?"})
    reply = lambda_handler(event, Context())
    cold_ms = (time.perf_counter() - T0) * 1000
    assert reply["statusCode"] == 200, reply
    with open(
        os.path.join(os.path.dirname(__file__), "..", "shared", "quantfn", "modelbuild", "data", "fidelity_corpus.txt")
    ) as f:
        corpus = [line.strip() for line in f if line.strip()]
    batches = [corpus[i : i + 32] for i in range(0, 320, 32)]
    events = []
    for batch in batches:
        copy = dict(event)
        copy["body"] = json.dumps({"model": "all-MiniLM-L6-v2", "input": batch})
        events.append(copy)
    lambda_handler(events[0], Context())  # warm
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        for item in events:
            assert lambda_handler(item, Context())["statusCode"] == 200
        rates.append(len(events) * 32 / (time.perf_counter() - started))
    print(json.dumps({"cold_ms": round(cold_ms, 1), "texts_per_s": rates}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
