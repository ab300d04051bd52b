"""Write a small clean / noisy corpus pair from the Python documentation that ships with Python.

    python examples/make_corpus.py runs/rho1/data      # -> clean.jsonl, noisy.jsonl (about 0.5 MB each)

The documentation topics (``pydoc_data.topics``) are cut at paragraph boundaries into documents of about
2,000 characters. ``noisy.jsonl`` holds every document, half of them (a seeded choice) corrupted: spans of 12
words replaced, with probability 0.6, by random words of the corpus or random character strings — the kind of
text a token selector should learn to skip. ``clean.jsonl`` holds the other half, uncorrupted: the clean data
a Rho-1 reference model trains on. Records are ``{"text": ...}``, what ``centrifuge train`` reads
(``data.path``). The files depend only on ``--seed`` and the Python version. ``experiments/utility/corpus.py``
builds the larger corpus (docstrings and comments of the standard library too) of the utility study.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string


def documents(chars: int = 2000) -> list[str]:
    """The documentation topics in documents of about ``chars`` characters, cut between paragraphs."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        current = ""
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            if current and len(current) + len(paragraph) > chars:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if current.strip():
            docs.append(current)
    return docs


def corrupt(text: str, rng: random.Random, vocabulary: list[str], *, span: int = 12, share: float = 0.6) -> str:
    """``text`` with about ``share`` of its ``span``-word spans replaced by random words or characters."""
    words = text.split()
    out = []
    for start in range(0, len(words), span):
        chunk = words[start:start + span]
        if rng.random() < share:
            if rng.random() < 0.5:
                chunk = rng.choices(vocabulary, k=len(chunk))
            else:
                chunk = ["".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(3, 9)))
                         for _ in chunk]
        out.extend(chunk)
    return " ".join(out)


def write_pair(directory: str, *, seed: int = 0, noise_fraction: float = 0.5) -> dict[str, int]:
    """Write ``clean.jsonl`` and ``noisy.jsonl`` into ``directory``; returns the document counts."""
    docs = documents()
    rng = random.Random(seed)
    vocabulary = sorted({w for d in docs for w in re.findall(r"[A-Za-z]{3,}", d)})
    noisy_ids = set(rng.sample(range(len(docs)), round(noise_fraction * len(docs))))
    noisy = [corrupt(d, rng, vocabulary) if i in noisy_ids else d for i, d in enumerate(docs)]
    clean = [d for i, d in enumerate(docs) if i not in noisy_ids]
    os.makedirs(directory, exist_ok=True)
    for name, texts in (("clean", clean), ("noisy", noisy)):
        with open(os.path.join(directory, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return {"clean": len(clean), "noisy": len(noisy), "corrupted": len(noisy_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where clean.jsonl and noisy.jsonl go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_pair(args.directory, seed=args.seed)
    print(f"wrote {args.directory}/clean.jsonl ({counts['clean']} documents) and {args.directory}/noisy.jsonl "
          f"({counts['noisy']} documents, {counts['corrupted']} corrupted)")


if __name__ == "__main__":
    main()
