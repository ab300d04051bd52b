"""``centrifuge train --print-config`` with the built-in default's comments: a config to start from that
explains itself. The comments come from ``configs/default.yaml`` (one per key, and the header lines of each
section), attached to the resolved values."""

from __future__ import annotations

import re

from centrifuge.train.config import Config, default_config_path, dump_yaml

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[\w]+):(?P<rest>.*)$")


def default_comments() -> dict[str, str]:
    """``section`` and ``section.key`` -> the comment on its line in ``configs/default.yaml``."""
    comments: dict[str, str] = {}
    section = None
    with open(default_config_path(), encoding="utf-8") as f:
        for line in f:
            match = _KEY.match(line.rstrip("\n"))
            if not match:
                continue
            name = match["key"]
            if not match["indent"]:
                section = name
            else:
                name = f"{section}.{name}"
            _, hash_, comment = match["rest"].partition("#")
            if hash_ and comment.strip():
                comments[name] = comment.strip()
    return comments


def commented_yaml(config: Config) -> str:
    """``dump_yaml(config)`` with each section's and key's comment from the built-in default appended."""
    comments = default_comments()
    lines = dump_yaml(config).splitlines()
    body = [(line, _name(line, lines[:i])) for i, line in enumerate(lines)]
    width = max((len(line) for line, name in body if name in comments), default=0) + 2
    out = ["# centrifuge train config: every key with its value; comments from the built-in default."]
    for line, name in body:
        comment = comments.get(name) if name else None
        out.append(f"{line.ljust(width)}# {comment}" if comment else line)
    return "\n".join(out) + "\n"


def _name(line: str, before: list[str]) -> str | None:
    """``section`` or ``section.key`` of a ``dump_yaml`` line (None for nested values)."""
    match = _KEY.match(line)
    if not match or len(match["indent"]) > 2:
        return None
    if not match["indent"]:
        return match["key"]
    section = next((b.split(":")[0] for b in reversed(before) if b and not b.startswith(" ")), None)
    return f"{section}.{match['key']}"
