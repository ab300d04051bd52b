"""File helpers shared by checkpoints (``train/checkpoint.py``) and reference-score shards
(``tokens/reference.py``): one place for how a file's content is fingerprinted."""

from __future__ import annotations

import hashlib


def sha256_file(path: str) -> str:
    """Hex sha256 of the file's bytes, read in 4 MiB blocks (the file is never held in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
