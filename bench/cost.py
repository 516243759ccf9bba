"""Price per million tokens and per million embeddings, on x86_64 and arm64, beside the alternatives.

Inputs are measured (x86_64 only; there is no Graviton here):
- API: the warm batch-1 latency of the handler at 1 and 2 threads, as priced per memory size by
  ``sections.lambda_cost`` (``results["cost"]``: time stretched by the vCPU share, 1 % cold starts billed);
- batch jobs: ``bench/batch.json``, embeddings/s of the real batch handler at 1 and 2 threads;
- tokens per text: the default model's tokenizer on the same texts (the batch job's lines, the API's
  typical request), counted as the API's ``usage`` counts them (special tokens included).

Assumed, and said so in the report: arm64 runs as many embeddings/s per vCPU as x86_64 (not
measured: Graviton cannot be emulated at speed); SageMaker Serverless gets vCPUs in Lambda's ratio;
the always-on GPU endpoint's hourly price (``GPU_ENDPOINT``). The alternatives' prices per million
embeddings use our token count per text (their tokenizers count a little differently).

    PYTHONPATH=shared:. .venv/bin/python bench/cost.py

run alone, adds the table to the last `make bench` run (bench/full_results.json, batch.json) and rewrites
results.json and REPORT.md; `make bench` computes it in bench/run.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
USD_PER_GB_S = {"x86_64": 0.0000166667, "arm64": 0.0000133334}  # Lambda list prices, first pricing tier
USD_PER_MILLION_REQUESTS = 0.20
MB_PER_VCPU = 1769
SAGEMAKER_SERVERLESS_USD_PER_GB_S = 0.00002
SAGEMAKER_SERVERLESS_MB = (1024, 2048, 3072)  # two threads are the most measured
# An assumption, not a quote: SageMaker real-time ml.g5.xlarge (1 A10G), on demand, us-east-1.
GPU_ENDPOINT = {"instance": "ml.g5.xlarge", "usd_per_hour": 1.408}
ALTERNATIVES = (  # $ per million input tokens, list prices
    ("OpenAI text-embedding-3-small", "API", 0.02),
    ("OpenAI text-embedding-3-small, Batch API", "batch", 0.01),
    ("Amazon Titan Text Embeddings V2 (Bedrock, on demand)", "API", 0.02),
)


def tokens_per_text(model_dir: Path, job_lines: int = 10_000) -> dict[str, float]:
    """Mean tokens per text of the batch benchmark's lines (the corpus, cycled) and of the API's typical request."""
    from bench.measure import TYPICAL
    from quantfn.modelbuild.reference import load_corpus
    from quantfn.tasks import load_tokenizer

    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    corpus = load_corpus()
    counts = [len(e.ids) for e in tokenizer.encode_batch(corpus)]
    batch = sum(counts[i % len(counts)] for i in range(job_lines)) / job_lines
    return {"batch": round(batch, 2), "api": float(len(tokenizer.encode(TYPICAL).ids))}


def _batch_seconds_per_embedding(batch: dict[str, Any], memory_mb: int) -> float:
    # The stretch model of sections.lambda_cost: below one vCPU time stretches by the share; from
    # 1,770 MB the job runs two threads on its share of two cores.
    share = memory_mb / MB_PER_VCPU
    threads = 1 if share <= 1 else 2
    return max(1.0, threads / share) / _batch_lines_per_s(batch, threads)


def _batch_lines_per_s(batch: dict[str, Any], vcpus: int) -> float:
    """Measured batch-job lines/s on ``vcpus`` cores: ``batch_throughput.py`` runs 1 and 2 pollers of one
    thread each, so ``vcpus`` pollers stand for one function with that many vCPUs."""
    return float(batch["by_pollers"][str(vcpus)]["lines_per_s"])


def table(api_rows: list[dict[str, Any]], batch: dict[str, Any], tokens: dict[str, float]) -> dict[str, Any]:
    """Rows per architecture and memory size, the alternatives, and the assumptions, as one JSON-able dict.

    ``api_rows`` are ``sections.lambda_cost`` rows (x86_64 prices); arm64's compute part scales by the
    GB-second price ratio at equal speed, the request fee stays.
    """
    gpu_usd_per_s = GPU_ENDPOINT["usd_per_hour"] / 3600
    rows = []
    for arch, price in USD_PER_GB_S.items():
        ratio = price / USD_PER_GB_S["x86_64"]
        for api in api_rows:
            per_request = (
                api["usd_per_million_requests"] - USD_PER_MILLION_REQUESTS
            ) * ratio + USD_PER_MILLION_REQUESTS
            per_embedding = (
                1e6 * _batch_seconds_per_embedding(batch, api["memory_mb"]) * api["memory_mb"] / 1024 * price
            )
            rows.append(
                {
                    "arch": arch,
                    "memory_mb": api["memory_mb"],
                    "api_usd_per_million_requests": round(per_request, 4),
                    "api_usd_per_million_tokens": round(per_request / tokens["api"], 5),
                    "batch_usd_per_million_embeddings": round(per_embedding, 4),
                    "batch_usd_per_million_tokens": round(per_embedding / tokens["batch"], 5),
                    # requests/s at which Lambda costs what an always-on GPU endpoint costs
                    "api_break_even_requests_per_s": round(gpu_usd_per_s / (per_request / 1e6), 1),
                    "batch_break_even_embeddings_per_s": round(gpu_usd_per_s / (per_embedding / 1e6), 1),
                }
            )
    serverless = []
    for memory in SAGEMAKER_SERVERLESS_MB:
        per_embedding = (
            1e6 * _batch_seconds_per_embedding(batch, memory) * memory / 1024 * SAGEMAKER_SERVERLESS_USD_PER_GB_S
        )
        serverless.append(
            {
                "memory_mb": memory,
                "usd_per_million_embeddings": round(per_embedding, 4),
                "usd_per_million_tokens": round(per_embedding / tokens["batch"], 5),
            }
        )
    alternatives = [
        {
            "service": name,
            "mode": mode,
            "usd_per_million_tokens": price,
            "usd_per_million_embeddings": round(price * tokens["batch"], 4),
        }
        for name, mode, price in ALTERNATIVES
    ]
    return {
        "tokens_per_text": tokens,
        "rows": rows,
        "sagemaker_serverless": serverless,
        "alternatives": alternatives,
        "gpu_endpoint": GPU_ENDPOINT,
        "assumptions": [
            "arm64 runs as many embeddings/s per vCPU as x86_64 (Graviton is not measured here)",
            f"always-on GPU endpoint: {GPU_ENDPOINT['instance']} on demand at ${GPU_ENDPOINT['usd_per_hour']}/h"
            " (an assumed list price; its capacity at the break-even rate is not measured)",
            "SageMaker Serverless gets vCPUs in Lambda's ratio (1 per 1,769 MB); compute price only",
            "alternatives' $ per million embeddings use quantfn's token count per text",
        ],
    }


def usd_per_million_tokens(cost: dict[str, Any]) -> float:
    """The headline: the cheapest measured (x86_64) batch-job price per million tokens."""
    return min(r["batch_usd_per_million_tokens"] for r in cost["rows"] if r["arch"] == "x86_64")


def _md_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join([*lines, *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows)])


def section(cost: dict[str, Any]) -> str:
    """REPORT.md's per-token section."""
    tokens = cost["tokens_per_text"]
    best = {
        arch: min((r for r in cost["rows"] if r["arch"] == arch), key=lambda r: r["batch_usd_per_million_tokens"])
        for arch in USD_PER_GB_S
    }
    assumptions = "\n".join(f"- {line}" for line in cost["assumptions"])
    return f"""## Price per million tokens, beside the alternatives (bench/cost.py)

Batch jobs from `bench/batch.json` (the real batch handler, {tokens["batch"]} tokens per text); the API from
the warm batch-1 latency above ({tokens["api"]:.0f} tokens per request, one text each). arm64 at Graviton's
${USD_PER_GB_S["arm64"]:.10f} per GB-second against ${USD_PER_GB_S["x86_64"]:.10f} for x86_64; requests
${USD_PER_MILLION_REQUESTS:.2f} per million on both. Break-even: the steady rate at which Lambda costs what an
always-on {cost["gpu_endpoint"]["instance"]} endpoint costs (${cost["gpu_endpoint"]["usd_per_hour"]}/h, assumed).

{_md_table(cost["rows"])}

Cheapest batch: x86_64 **${best["x86_64"]["batch_usd_per_million_tokens"]}** per million tokens
({best["x86_64"]["memory_mb"]} MB), arm64 **${best["arm64"]["batch_usd_per_million_tokens"]}** (assumed speed).

{_md_table(cost["alternatives"])}

SageMaker Serverless Inference running the same model at ${SAGEMAKER_SERVERLESS_USD_PER_GB_S:.5f} per GB-second:

{_md_table(cost["sagemaker_serverless"])}

Assumptions:

{assumptions}
"""


def main() -> int:
    """Add the per-token table to the last `make bench` results (full_results.json) without measuring again."""
    sys.path[:0] = [str(REPO / "shared"), str(REPO)]
    from bench import report

    bench = REPO / "bench"
    full = json.loads((bench / "full_results.json").read_text())
    batch = json.loads((bench / "batch.json").read_text())
    full["token_cost"] = table(full["cost"], batch, tokens_per_text(REPO / "build" / "models" / "all-minilm-l6-v2"))
    full["headline"]["usd_per_million_tokens"] = usd_per_million_tokens(full["token_cost"])
    (bench / "results.json").write_text(json.dumps(full["headline"], indent=2) + "\n")
    (bench / "full_results.json").write_text(json.dumps(full, indent=2, default=float) + "\n")
    report.write(full, bench)
    print(section(full["token_cost"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
