"""README snippets marked ``<!-- snippet: NAME -->`` run as written (the next fenced python block)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def marked_snippets() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- snippet: ([\w-]+) -->\s*```python\n(.*?)```", text, re.S))


def test_the_readme_marks_snippets():
    assert "checkpointing" in marked_snippets()


@pytest.mark.parametrize("name", sorted(marked_snippets()))
def test_snippet_runs(name):
    exec(compile(marked_snippets()[name], f"README snippet {name}", "exec"), {})
