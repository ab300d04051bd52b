"""The study's text: clean documents from what ships with Python, a noisy training mixture, a clean held-out split.

Sources (nothing to download; every machine with Python has them):

- ``pydoc``: the topics of the Python documentation in ``pydoc_data.topics``;
- ``docstrings``: the docstrings of every module, class and function of the standard library (``ast``);
- ``comments``: blocks of full-line ``#`` comments of the standard library's source (prose-like blocks only).

Each source is cut into documents of about ``doc_chars`` characters at paragraph boundaries; paragraphs seen
before are dropped (the standard library repeats many docstrings). A seeded shuffle then holds out
``eval_fraction`` of the characters as the **clean** evaluation split. Of the remaining training documents,
``noise_fraction`` are corrupted: they are cut into spans of ``span_words`` words, and each span is replaced with
probability ``span_share`` by one kind of noise:

- ``random``: random words of the corpus vocabulary and random character strings (random-token spans);
- ``shuffle``: the span's own words in random order;
- ``boilerplate``: a boilerplate paragraph (web-page chrome, licence text) repeated to the span's length.

Files written to ``DIR`` (``write_corpus``): ``train.jsonl`` (the noisy mixture, what every arm trains on),
``reference.jsonl`` (the uncorrupted training documents: the clean data a reference model trains on),
``eval.jsonl`` (held-out clean documents) and ``manifest.json`` (settings, counts, file hashes). Records are
``{"text": ..., "source": ..., "corrupted": bool, "noise_chars": int}``; ``centrifuge train`` reads ``text``.
Everything is a function of the seed and the Python installation (its version is in the manifest).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from centrifuge._io import atomic_write

SOURCES = ("pydoc", "docstrings", "comments")
NOISE_KINDS = ("random", "shuffle", "boilerplate")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}

# Written for this study: the kind of repeated page furniture that crawled web text is full of.
BOILERPLATE = (
    "Home | About | Contact | Privacy Policy | Terms of Use. Subscribe to our newsletter for the latest updates. "
    "Click here to accept cookies. All rights reserved.",
    "This page was last edited on a recent date. Share on social media: Facebook Twitter LinkedIn Email. "
    "Related posts you may also like. Leave a comment below.",
    "Copyright (c) the authors. Permission is hereby granted to copy and distribute this notice, provided "
    "that this notice appears in all copies. THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND.",
    "Sign in to continue. Forgot your password? Create an account. Loading... Please enable JavaScript to view "
    "this content. Advertisement. Skip to main content.",
)


@dataclass(frozen=True)
class CorpusSettings:
    """How the corpus is built; every field goes into the manifest."""

    seed: int = 0
    sources: tuple[str, ...] = SOURCES
    doc_chars: int = 2000  # target document length; a document closes at the first paragraph past it
    min_doc_chars: int = 200  # shorter pieces are dropped
    max_docs: int = 0  # 0 = all documents (a small number makes a quick smoke corpus)
    eval_fraction: float = 0.1  # share of characters held out (clean)
    noise_fraction: float = 0.5  # share of training documents that are corrupted
    span_share: float = 0.6  # share of a corrupted document's spans that are replaced by noise
    span_words: tuple[int, int] = (8, 40)  # span length range, in words
    noise_kinds: tuple[str, ...] = NOISE_KINDS

    def validate(self) -> None:
        unknown = sorted(set(self.sources) - set(SOURCES)) + sorted(set(self.noise_kinds) - set(NOISE_KINDS))
        if unknown:
            raise ValueError(f"unknown corpus source / noise kind: {', '.join(unknown)}")
        if not (0 < self.eval_fraction < 1 and 0 <= self.noise_fraction <= 1 and 0 <= self.span_share <= 1):
            raise ValueError("eval_fraction must be in (0, 1); noise_fraction and span_share in [0, 1]")


@dataclass
class Doc:
    """One document of the study."""

    text: str
    source: str  # "pydoc:<topic>", "docstrings:<module path>" or "comments:<module path>"
    corrupted: bool = False
    noise_chars: int = 0  # characters of inserted noise
    kinds: list[str] = field(default_factory=list)  # noise kinds used (corrupted documents)

    def record(self) -> dict:
        return {"text": self.text, "source": self.source, "corrupted": self.corrupted,
                "noise_chars": self.noise_chars, "kinds": self.kinds}


# ----------------------------------------------------------------------------------------- clean sources


def _stdlib_files() -> Iterator[tuple[str, str]]:
    """(module path relative to the standard library, source text) of every ``.py`` file, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, root), f.read()
                except (OSError, UnicodeDecodeError):
                    continue


def _docstrings(source: str) -> list[str]:
    """Docstrings of a module and of its classes and functions, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
    return [doc for n in nodes if (doc := ast.get_docstring(n))]


_COMMENT = re.compile(r"^[ \t]*#(?!!)[ \t]?(.*)$")


def _comment_blocks(source: str) -> list[str]:
    """Runs of full-line comments that read like prose: 3+ lines, 150+ characters, mostly letters."""
    blocks, current = [], []
    for line in [*source.splitlines(), ""]:
        match = _COMMENT.match(line)
        if match:
            current.append(match.group(1).rstrip())
            continue
        text = "\n".join(current).strip()
        current = []
        letters = sum(ch.isalpha() or ch.isspace() for ch in text)
        if text.count("\n") >= 2 and len(text) >= 150 and letters >= 0.8 * len(text):
            blocks.append(text)
    return blocks


def source_texts(sources: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(source label, text) pairs: one per pydoc topic, one per standard-library file and kind."""
    if "pydoc" in sources:
        from pydoc_data import topics

        for name in sorted(topics.topics):
            yield f"pydoc:{name}", topics.topics[name]
    if "docstrings" in sources or "comments" in sources:
        for rel, code in _stdlib_files():
            if "docstrings" in sources and (docs := _docstrings(code)):
                yield f"docstrings:{rel}", "\n\n".join(docs)
            if "comments" in sources and (blocks := _comment_blocks(code)):
                yield f"comments:{rel}", "\n\n".join(blocks)


def clean_documents(settings: CorpusSettings) -> list[Doc]:
    """Every source cut into documents of about ``doc_chars`` characters; repeated paragraphs dropped."""
    seen: set[str] = set()
    docs: list[Doc] = []
    for label, text in source_texts(settings.sources):
        pieces: list[str] = []
        size = 0
        for para in re.split(r"\n\s*\n", text):
            para = para.strip("\n")
            key = " ".join(para.split())
            if not key or key in seen:
                continue
            seen.add(key)
            pieces.append(para)
            size += len(para)
            if size >= settings.doc_chars:
                docs.append(Doc("\n\n".join(pieces), label))
                pieces, size = [], 0
        if pieces:
            docs.append(Doc("\n\n".join(pieces), label))
    docs = [d for d in docs if len(d.text) >= settings.min_doc_chars]
    if settings.max_docs:
        docs = docs[: settings.max_docs]
    return docs


# ------------------------------------------------------------------------------------------------ noise


def _random_string(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+=/#@$%&*"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9)))


def _noise_span(kind: str, words: list[str], rng: random.Random, vocabulary: Sequence[str]) -> str:
    """Replacement text for a span of ``words`` (each with its trailing whitespace)."""
    if kind == "random":
        n = len(words)
        return " ".join(rng.choice(vocabulary) if rng.random() < 0.7 else _random_string(rng) for _ in range(n))
    if kind == "shuffle":
        shuffled = [w.strip() for w in words]
        rng.shuffle(shuffled)
        return " ".join(shuffled)
    target = sum(len(w) for w in words)
    text = rng.choice(BOILERPLATE)
    out = text
    while len(out) < target:
        out += " " + text
    return out[:target].rsplit(" ", 1)[0] or out[:target]  # cut to the span's length at a word boundary


def corrupt(doc: Doc, rng: random.Random, settings: CorpusSettings, vocabulary: Sequence[str]) -> Doc:
    """``doc`` with about ``span_share`` of its word spans replaced by noise (see the module docstring)."""
    words = re.findall(r"\S+\s*", doc.text)
    out: list[str] = []
    noise_chars, kinds = 0, set()
    i = 0
    low, high = settings.span_words
    while i < len(words):
        span = words[i : i + rng.randint(low, high)]
        i += len(span)
        if rng.random() < settings.span_share:
            kind = rng.choice(settings.noise_kinds)
            noise = _noise_span(kind, span, rng, vocabulary)
            tail = span[-1][len(span[-1].rstrip()) :] or " "  # keep the span's closing whitespace (newlines)
            out.append(noise + tail)
            noise_chars += len(noise)
            kinds.add(kind)
        else:
            out.extend(span)
    return Doc("".join(out), doc.source, corrupted=True, noise_chars=noise_chars, kinds=sorted(kinds))


# ------------------------------------------------------------------------------------------- the corpus


@dataclass
class Corpus:
    train: list[Doc]  # the noisy mixture, in a seeded order
    reference: list[Doc]  # the uncorrupted training documents
    eval: list[Doc]  # held-out clean documents


def build_corpus(settings: CorpusSettings) -> Corpus:
    """Clean documents -> seeded held-out split -> a corrupted share of the training documents."""
    settings.validate()
    docs = clean_documents(settings)
    if len(docs) < 4:
        raise ValueError(f"only {len(docs)} documents found; the corpus needs at least 4")
    rng = random.Random(settings.seed)
    rng.shuffle(docs)
    target, held = settings.eval_fraction * sum(len(d.text) for d in docs), 0
    split = 0
    while split < len(docs) - 2 and held < target:
        held += len(docs[split].text)
        split += 1
    evals, train = docs[:split], docs[split:]
    vocabulary = sorted({w for d in train for w in re.findall(r"[A-Za-z][A-Za-z']+", d.text)})
    corrupted = set(rng.sample(range(len(train)), round(settings.noise_fraction * len(train))))
    mixture = [corrupt(d, rng, settings, vocabulary) if i in corrupted else d for i, d in enumerate(train)]
    reference = [d for i, d in enumerate(train) if i not in corrupted]
    return Corpus(mixture, reference, evals)


def _write_jsonl(path: str, docs: Sequence[Doc]) -> str:
    """Write ``docs`` one JSON record a line; returns the file's sha256."""
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                line = json.dumps(doc.record(), ensure_ascii=False) + "\n"
                digest.update(line.encode("utf-8"))
                f.write(line)

    atomic_write(path, write)
    return digest.hexdigest()


def write_corpus(directory: str, settings: CorpusSettings) -> dict:
    """Build the corpus and write ``train.jsonl``, ``reference.jsonl``, ``eval.jsonl`` and ``manifest.json``
    (written last: a directory with a manifest is complete). Returns the manifest."""
    corpus = build_corpus(settings)
    os.makedirs(directory, exist_ok=True)
    files = {}
    for name, docs in (("train", corpus.train), ("reference", corpus.reference), ("eval", corpus.eval)):
        chars = sum(len(d.text) for d in docs)
        noise = sum(d.noise_chars for d in docs)
        files[name] = {
            "file": f"{name}.jsonl", "documents": len(docs), "chars": chars,
            "corrupted_documents": sum(d.corrupted for d in docs),
            "noise_char_fraction": noise / max(chars, 1),
            "sha256": _write_jsonl(os.path.join(directory, f"{name}.jsonl"), docs),
        }  # fmt: skip
    by_source: dict[str, int] = {}
    for doc in [*corpus.train, *corpus.eval]:
        kind = doc.source.split(":", 1)[0]
        by_source[kind] = by_source.get(kind, 0) + 1
    manifest = {
        "settings": asdict(settings),
        "documents_by_source": by_source,
        "python": sys.version.split()[0],
        "stdlib": sysconfig.get_paths()["stdlib"],
        "files": files,
        "fingerprint": hashlib.sha256("".join(f["sha256"] for f in files.values()).encode()).hexdigest()[:16],
    }
    with open(os.path.join(directory, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_texts(path: str) -> list[str]:
    """The ``text`` fields of a jsonl file written by ``write_corpus``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
