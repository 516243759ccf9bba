"""`make demo`: the real API handler answers the events/ requests with the built model.

Runs in one fresh process so the first request is a true cold start: import,
model verification and session creation included.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from quantfn.models.manifest import Manifest


class _Context:
    function_name = "quantfn-api-demo"
    memory_limit_in_mb = 2048
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:quantfn-api-demo"
    aws_request_id = "demo"

    def get_remaining_time_in_millis(self) -> int:
        return 29_000


def _post(base: dict, body: dict) -> dict:
    event = json.loads(json.dumps(base))
    event["body"] = json.dumps(body)
    return event


def run_demo(models_root: Path, repo: Path) -> int:
    # Serve every built model in the layer (the default first), as QUANTFN_MODELS would in the template.
    names = sorted(path.parent.name for path in models_root.glob("*/manifest.json"))
    names = ["all-minilm-l6-v2"] + [name for name in names if name != "all-minilm-l6-v2"]
    os.environ.pop("QUANTFN_MODEL", None)
    os.environ.update(
        QUANTFN_MODELS=",".join(f"{name}=layer:{name}" for name in names),
        QUANTFN_MODELS_ROOT=str(models_root),
        POWERTOOLS_LOG_LEVEL="ERROR",
        POWERTOOLS_METRICS_DISABLED="true",
    )
    events = {path.name: json.loads(path.read_text()) for path in sorted((repo / "events").glob("api-*.json"))}
    manifest = json.loads((models_root / "all-minilm-l6-v2" / "manifest.json").read_text())
    fidelity = manifest["fidelity"]
    weights = Manifest.from_dict(manifest).weights_size
    print(f"model      {manifest['model_id']}  recipe {manifest['quantization']['recipe']}")
    print(f"files      {weights / 2**20:.1f} MB  ({manifest.get('size_ratio_vs_fp32', float('nan')):.1%} of fp32)")
    print(
        f"fidelity   cosine mean {fidelity['cosine_mean']:.5f}  min {fidelity['cosine_min']:.5f}  "
        f"recall@5 {fidelity['recall_at_5']:.4f}  (vs fp32 PyTorch, {fidelity.get('sentences', '?')} sentences)"
    )

    started = time.perf_counter()
    from functions.api.app import lambda_handler
    from quantfn.registry import get_registry

    imported = time.perf_counter()
    first = lambda_handler(events["api-embeddings.json"], _Context())
    answered = time.perf_counter()
    body = json.loads(first["body"])
    print(
        f"\ncold start import {1000 * (imported - started):.0f} ms"
        f" + first request {1000 * (answered - imported):.0f} ms"
        f" (model load {get_registry().load_ms(get_registry().default):.0f} ms) = {1000 * (answered - started):.0f} ms"
    )
    print(f"dimensions {len(body['data'][0]['embedding'])}, usage {body['usage']}\n")

    print("events/ through the handler:")
    for name, event in events.items():
        reply = lambda_handler(event, _Context())
        payload = json.loads(reply["body"])
        if "error" in payload:
            summary = f"{payload['error']['code']}: {payload['error']['message'][:80]}"
        elif payload.get("object") == "list" and payload.get("data") and "embedding" in payload["data"][0]:
            summary = f"{len(payload['data'])} embeddings ({payload['usage']['prompt_tokens']} tokens)"
        elif "embeddings" in payload:  # Cohere embed: each type's first values
            by_type = payload["embeddings"]
            by_type = by_type if isinstance(by_type, dict) else {"float": by_type}  # v1 without types: floats
            firsts = [f"{kind} {_head(rows[0])}" for kind, rows in by_type.items()]
            summary = f"{len(payload['texts'])} texts: " + "; ".join(firsts)
        elif "results" in payload:  # rerank: the best document and its score
            best = payload["results"][0]
            summary = (
                f"best document {best['index']} (score {best['relevance_score']:.3f}) of {len(payload['results'])}"
            )
        elif payload.get("data") and "labels" in payload["data"][0]:  # classify: each input's top label
            tops = [f"{item['labels'][0]['label']} {item['labels'][0]['score']:.2f}" for item in payload["data"]]
            summary = "top labels: " + ", ".join(tops)
        else:
            summary = json.dumps(payload)[:90]
        print(f"  {reply['statusCode']}  {name:36s} {summary}")

    sentences = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar.",
        "The stock market fell sharply today.",
        "Shares dropped steeply in today's trading.",
    ]
    reply = lambda_handler(
        _post(events["api-embeddings.json"], {"model": "all-MiniLM-L6-v2", "input": sentences}), _Context()
    )
    vectors = np.array([item["embedding"] for item in json.loads(reply["body"])["data"]])
    similarity = vectors @ vectors.T
    print("\ncosine similarity:")
    for i, sentence in enumerate(sentences):
        print(f"  {' '.join(f'{v:5.2f}' for v in similarity[i])}  {sentence}")

    warm = []
    for _ in range(30):
        t0 = time.perf_counter()
        lambda_handler(events["api-embeddings-single.json"], _Context())
        warm.append(1000 * (time.perf_counter() - t0))
    batch = _post(events["api-embeddings.json"], {"model": "all-MiniLM-L6-v2", "input": sentences * 8})
    warm32 = []
    for _ in range(10):
        t0 = time.perf_counter()
        lambda_handler(batch, _Context())
        warm32.append(1000 * (time.perf_counter() - t0))
    print(
        f"\nwarm       1 input: median {statistics.median(warm):.1f} ms   "
        f"32 inputs: median {statistics.median(warm32):.1f} ms "
        f"({32000 / statistics.median(warm32):.0f} inputs/s, {get_registry().settings.runtime.threads} threads)"
    )
    return 0


def _head(row: list | str) -> str:
    """The first values of one embedding (or the start of a base64 one), for a line of the demo."""
    if isinstance(row, str):
        return row[:12] + "..."
    return "[" + ", ".join(f"{value:.3g}" for value in row[:3]) + ", ...]"
