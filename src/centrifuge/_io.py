"""File helpers: how a file's content is fingerprinted (``sha256_file``), and writing files so that a reader (or a
crash, even SIGKILL) sees the old file or the new one, never half of one.

One place for the second: checkpoints, score manifests and shards, the token cache, tokenizers, metrics logs and plots
all write through ``atomic_write``: a hidden temporary file in the destination's directory (same file system,
so ``os.replace`` is atomic), flushed to disk, then moved over the destination; on failure the temporary file
is removed and the destination is untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any


def sha256_file(path: str) -> str:
    """Hex sha256 of the file's bytes, read in 4 MiB blocks (the file is never held in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str) -> None:
    """Flush a file or directory to disk (best effort: some file systems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], *, suffix: str = ".tmp") -> None:
    """Create ``path`` through ``write(tmp_path)`` (which writes the whole file at ``tmp_path``), then fsync and
    ``os.replace``. ``suffix``: the temporary name's ending (e.g. ".png" for writers that read the format off
    the name)."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, data: Any) -> None:
    """JSON with one-space indents and a final newline (not atomic: for files inside a directory that is
    itself moved into place)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def write_json_atomic(path: str, data: Any) -> None:
    """``write_json`` through ``atomic_write``."""
    atomic_write(path, lambda tmp: write_json(tmp, data))


def write_text_atomic(path: str, text: str) -> None:
    """A text file through ``atomic_write``."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
