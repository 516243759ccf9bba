"""One cold start, in a fresh process: nothing -> first answer. Prints one JSON line.

    python bench/cold_child.py handler|ort-fp32|st-torch <model-dir-or-root>

Run by bench/run.py (which measures the wall time from spawn to that line);
phases are measured here with perf_counter.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

TEXT = "How long does a cold start take before the first embedding is ready?"


def ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


def handler() -> dict:
    started = time.perf_counter()
    from functions.api.app import lambda_handler
    from quantfn.registry import get_registry

    phases = {"import": ms(started)}
    with open(os.path.join(os.environ["QUANTFN_REPO"], "events", "api-embeddings-single.json")) as handle:
        event = json.load(handle)
    event["body"] = json.dumps({"model": "all-MiniLM-L6-v2", "input": TEXT})

    class Context:
        function_name, memory_limit_in_mb, aws_request_id = "bench", 2048, "bench"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"

        def get_remaining_time_in_millis(self) -> int:
            return 29_000

    started = time.perf_counter()
    reply = lambda_handler(event, Context())
    first = ms(started)
    assert reply["statusCode"] == 200, reply
    load = get_registry().default.load_phases_ms
    phases |= {"model_fetch": load["fetch"], "session": load["session"] + load["tokenizer"]}
    phases["first_inference"] = round(first - sum(load.values()), 2)
    return phases


def ort_fp32(model_dir: str) -> dict:
    started = time.perf_counter()
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    phases = {"import": ms(started)}
    started = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("QUANTFN_THREADS", "2"))
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    phases["session"] = ms(started)
    started = time.perf_counter()
    ids = np.array([tokenizer.encode(TEXT).ids], dtype=np.int64)
    hidden = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    vector = hidden.mean(axis=1)
    vector /= np.linalg.norm(vector)
    phases["first_inference"] = ms(started)
    return phases


def st_torch(model_dir: str) -> dict:
    started = time.perf_counter()
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(int(os.environ.get("QUANTFN_THREADS", "2")))
    phases = {"import": ms(started)}
    started = time.perf_counter()
    model = SentenceTransformer(model_dir, device="cpu")
    phases["session"] = ms(started)
    started = time.perf_counter()
    model.encode([TEXT])
    phases["first_inference"] = ms(started)
    return phases


if __name__ == "__main__":
    mode = sys.argv[1]
    phases = handler() if mode == "handler" else ort_fp32(sys.argv[2]) if mode == "ort-fp32" else st_torch(sys.argv[2])
    print(json.dumps({"mode": mode, "phases": phases, "in_process_ms": ms(T0)}), flush=True)
    os._exit(0)  # the answer is out: interpreter teardown is not part of a cold start
