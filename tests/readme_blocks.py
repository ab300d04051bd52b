"""The README's fenced code blocks, their markers, and how the tests run the shell ones.

Each fenced block in README.md has a marker on the line right before its fence, naming what runs it:

- ``<!-- example: FILE -->``: a verbatim copy of FILE, which ``tests/test_examples.py`` runs;
- ``<!-- snippet: NAME -->``: python that ``tests/test_readme_snippets.py`` runs as written;
- ``<!-- shell: NAME -->``: shell lines that ``tests/test_readme_blocks.py`` runs as written, one by one, in a
  scratch directory, then checks what they did;
- ``<!-- config: NAME -->``: a YAML config fragment that ``tests/test_readme_blocks.py`` loads as a config;
- ``<!-- ci: FILE -->``: lines that FILE (``.ci/run``) runs as written: the set-up itself;
- ``<!-- exempt: REASON -->``: run by nothing, for the stated reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
FENCE = re.compile(r"^\s*```(\w*)\s*$")
MARKER = re.compile(r"<!-- (example|snippet|shell|config|ci|exempt): (.+?) -->")
# Toy-size `--set` items for the example scripts, which pass their extra arguments to every command.
TOY = [
    "model.overrides={vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 2, num_key_value_heads: 1}",
    "data.seq_len=64", "train.batch_size=4", "train.steps=3", "train.warmup_steps=1", "eval.max_batches=1",
    "log.tensorboard=false", "log.plot=false", "neurons.multiple=16",
]


@dataclass(frozen=True)
class Block:
    """One fenced block: the line of its opening fence, its language, its text and its marker."""

    line: int
    lang: str
    body: str
    kind: str | None
    name: str | None


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README (or of ``text``), in order."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines(keepends=True)
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README line {i + 1}: a fence that is never closed"
        marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
        kind, name = marker.groups() if marker else (None, None)
        blocks.append(Block(i + 1, opening.group(1), "".join(lines[i + 1:end]), kind, name))
        i = end + 1
    return blocks


def marked(kind: str, name: str) -> Block:
    """The one block marked ``<!-- kind: name -->``."""
    found = [b for b in readme_blocks() if (b.kind, b.name) == (kind, name)]
    assert len(found) == 1, f"README: {len(found)} blocks marked <!-- {kind}: {name} -->"
    return found[0]


def commands(block: Block) -> list[str]:
    """The block's commands as typed, one per line (a line ending in a backslash goes on to the next)."""
    out: list[str] = []
    pending = ""
    for line in block.body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
    assert not pending, f"README line {block.line}: the block ends in a line continuation"
    return out


def shell_env(**extra: str) -> dict[str, str]:
    """The environment a README command runs in: this interpreter's scripts (centrifuge, torchrun, tensorboard,
    pip) first on PATH, one thread per process, and nothing else changed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def run_command(command: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """One README command, exactly as typed, through bash; a failure shows its output."""
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def run_example_script(script: str, workdir: Path) -> subprocess.CompletedProcess:
    """``bash examples/SCRIPT --set ...`` (toy size) in ``workdir`` with a copy of examples/ (the scripts write
    runs/ of the working directory)."""
    if not (workdir / "examples").exists():
        shutil.copytree(EXAMPLES, workdir / "examples")
    args = [arg for item in [*TOY, f"data.cache_dir={workdir / 'cache'}"] for arg in ("--set", item)]
    out = subprocess.run(["bash", f"examples/{script}", *args], cwd=workdir, env=shell_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out
