"""Every fenced block of README.md is run as written by a test (or by ``.ci/run``) and its result checked.

The shell blocks run here one command at a time, exactly as typed, through bash in a scratch directory
(``tests/readme_blocks.py``): only the working directory and the environment are the test's (PATH starts with
this interpreter's scripts, one thread per process, ``CENTRIFUGE_CACHE`` in the scratch directory; for pip,
a throwaway virtual environment that sees the installed packages, and no package index). The commands of
``centrifuge train`` and ``torchrun`` share one scratch directory, in README order, with the toy
``examples/compare.sh`` runs the plot commands draw.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from readme_blocks import (
    ROOT,
    Block,
    commands,
    marked,
    readme_blocks,
    run_command,
    shell_env,
)

# Who runs each marker's blocks: a new shell or config block needs its test here first.
SHELL_BLOCKS = {"install", "wheel", "train", "plot", "torchrun"}
CONFIG_BLOCKS = {"tokens"}
CI_FILES = {".ci/run"}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def test_every_readme_block_is_run_by_a_test_or_exempt_with_a_reason():
    blocks = readme_blocks()
    runs_examples = "".join((ROOT / "tests" / f).read_text(encoding="utf-8")
                            for f in ("test_examples.py", "conftest.py"))
    assert len(blocks) >= 15, "the README's fenced blocks were not found"
    unmarked = [f"README line {b.line} ({b.lang or 'no language'})" for b in blocks if b.kind is None]
    assert not unmarked, f"fenced blocks that no test runs (mark them, see tests/readme_blocks.py): {unmarked}"
    for b in blocks:
        where = f"README line {b.line}"
        if b.kind == "example":
            assert (ROOT / b.name).is_file(), f"{where}: no file {b.name}"  # test_examples checks the copy
            assert f'"{Path(b.name).name}"' in runs_examples, f"{where}: no test runs {b.name}"
        elif b.kind == "snippet":
            assert b.lang == "python", f"{where}: snippets are python (test_readme_snippets runs them)"
        elif b.kind == "shell":
            assert b.lang == "sh" and b.name in SHELL_BLOCKS, f"{where}: no test here runs shell block {b.name!r}"
        elif b.kind == "config":
            assert b.lang == "yaml" and b.name in CONFIG_BLOCKS, f"{where}: no test here loads config {b.name!r}"
        elif b.kind == "ci":
            assert b.name in CI_FILES, f"{where}: {b.name} is not the CI script"
        else:
            assert len(b.name.split()) >= 3, f"{where}: an exemption states its reason in words: {b.name!r}"
    names = [(b.kind, b.name) for b in blocks if b.kind in ("shell", "config")]
    assert sorted(names) == sorted({("shell", n) for n in SHELL_BLOCKS} | {("config", n) for n in CONFIG_BLOCKS})


def test_an_unmarked_block_is_found():
    text = "intro\n<!-- shell: train -->\n```sh\nls\n```\n\n```python\nprint(1)\n```\n  ```\nraw\n  ```\n"
    blocks = readme_blocks(text)
    assert [(b.line, b.lang, b.kind) for b in blocks] == [(3, "sh", "shell"), (7, "python", None), (10, "", None)]
    assert commands(Block(1, "sh", "a \\\n  b  # c\n# note\n\nd\n", "shell", "x")) == ["a   b  # c", "d"]


def test_the_ci_block_is_what_ci_runs():
    """``.ci/run`` runs the README's opening block line for line (make demo, make test), and checks the demo's
    run after it."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for b in readme_blocks():
        if b.kind == "ci":
            lines = b.body.splitlines()
            at = [ci.index(line) if line in ci else -1 for line in lines]
            assert -1 not in at and at == sorted(at), f"{b.name} does not run README line {b.line}'s block as written"
    demo = ci.index(next(line for line in ci if line.startswith("make demo")))
    assert ci[demo + 1].startswith(".venv/bin/python scripts/check_demo.py runs ")


def test_the_tokens_config_block_is_the_default_tokens_section(tmp_path):
    from centrifuge.train.config import load_config

    block = marked("config", "tokens")
    (tmp_path / "tokens.yaml").write_text(block.body, encoding="utf-8")
    config = load_config(str(tmp_path / "tokens.yaml"))  # read and checked as any config file
    default = load_config()
    shown = yaml.safe_load(block.body)["tokens"]
    assert shown and {k: getattr(config.tokens, k) for k in shown} == shown  # "on by default": the defaults
    assert {k: getattr(default.tokens, k) for k in shown} == shown


# ---------------------------------------------------------------------------------------------------------
# pip: a throwaway environment that sees the installed packages, and no index


def copy_repo(dest: Path) -> Path:
    """What ``pip install .`` reads from the repository root."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def throwaway_venv(path: Path) -> dict[str, str]:
    """A new virtual environment that also sees this one's packages (a ``.pth`` line: the way
    ``--system-site-packages`` shows a system's packages), whose ``pip`` is first on PATH; pip reads no
    config and no index, so nothing can be downloaded. Returns its environment for commands."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    # This environment's site-packages (and the system's, where it sees them: a GPU machine's torch): pip,
    # setuptools, torch and the rest; not its editable centrifuge, a .pth of its own that a path line does not run.
    seen = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (Path(site_dir) / "_installed_packages.pth").write_text("".join(f"{p}\n" for p in seen))
    pip = path / "bin" / "pip"
    pip.write_text(f"#!{python}\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n")
    pip.chmod(0o755)
    env = {k: v for k, v in shell_env().items() if not k.startswith("PIP_")}
    env.update(PATH=f"{path / 'bin'}:{env['PATH']}", PIP_NO_INDEX="1", PIP_CONFIG_FILE="/dev/null",
               PIP_DISABLE_PIP_VERSION_CHECK="1", VIRTUAL_ENV=str(path))
    return env


def package_dir(venv: Path, env: dict[str, str]) -> Path:
    """Where the venv's python finds the ``centrifuge`` package (without running it)."""
    code = "import importlib.util; print(importlib.util.find_spec('centrifuge').origin)"
    return Path(run_command(f"{venv / 'bin' / 'python'} -c \"{code}\"", venv, env).stdout.strip()).parent


def test_install_block_installs_editable_offline(tmp_path):
    block = marked("shell", "install")
    lines = commands(block)
    assert [c.split("#")[0].split()[:2] for c in lines] == [["pip", "install"], ["centrifuge", "--version"]]
    env, repo = throwaway_venv(tmp_path / "venv"), copy_repo(tmp_path / "repo")
    installed = run_command(lines[0], repo, env)
    assert f"Successfully installed centrifuge-llm-{VERSION}" in installed.stdout
    assert re.search(r"Requirement already satisfied: tensorboard>=", installed.stdout)  # the extra, offline
    assert shutil.which("centrifuge", path=env["PATH"]) == str(tmp_path / "venv" / "bin" / "centrifuge")
    version = run_command(lines[1], tmp_path, env)
    assert version.stdout.strip() == lines[1].split("#")[1].strip() == f"centrifuge {VERSION}"
    assert package_dir(tmp_path / "venv", env) == repo / "src" / "centrifuge"  # editable: the clone's files


def test_wheel_block_builds_a_wheel_that_installs_offline(tmp_path):
    block = marked("shell", "wheel")
    build, install = commands(block)
    env, repo = throwaway_venv(tmp_path / "venv"), copy_repo(tmp_path / "repo")
    run_command(build, repo, env)
    wheel = re.search(r'"(dist/[^"\[]+\.whl)', install)
    assert wheel and (repo / wheel.group(1)).is_file(), sorted(p.name for p in (repo / "dist").iterdir())
    done = run_command(install, repo, env)
    assert f"Successfully installed centrifuge-llm-{VERSION}" in done.stdout
    shutil.rmtree(repo)  # the installed wheel stands alone
    package = package_dir(tmp_path / "venv", env)
    assert package.is_relative_to(tmp_path / "venv" / "lib") and (package / "configs" / "default.yaml").is_file()
    assert shutil.which("centrifuge", path=env["PATH"]) == str(tmp_path / "venv" / "bin" / "centrifuge")
    assert run_command("centrifuge --version", tmp_path, env).stdout.strip() == f"centrifuge {VERSION}"


# ---------------------------------------------------------------------------------------------------------
# centrifuge train / plot / tensorboard / torchrun, in one scratch directory


def run_records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def steps_in(command: str) -> int:
    found = re.findall(r"train\.steps=(\d+)", command)
    assert len(found) == 1, command
    return int(found[0])


@pytest.fixture(scope="module")
def trained(compare_workspace):
    """The ``centrifuge train`` block, run as written; returns (workdir, run directory, outputs)."""
    workdir, _ = compare_workspace
    env = shell_env(CENTRIFUGE_CACHE=str(workdir / "cache"))
    before = set((workdir / "runs").iterdir())
    outputs = [run_command(c, workdir, env) for c in commands(marked("shell", "train"))]
    new = sorted(set((workdir / "runs").iterdir()) - before)
    assert len(new) == 1, new  # one run, resumed in place
    return workdir, new[0], outputs


def test_train_block(trained):
    workdir, run, outputs = trained
    lines = commands(marked("shell", "train"))
    assert lines[0].startswith("centrifuge train --print-config > my.yaml")
    default = (ROOT / "src" / "centrifuge" / "configs" / "default.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load((workdir / "my.yaml").read_text()) == yaml.safe_load(default)  # every key, defaults
    first, last = steps_in(lines[1]), steps_in(lines[2])
    assert "my.yaml" in lines[1] and "--resume" in lines[2] and first < last
    assert f"done: {first} steps" in outputs[1].stdout
    assert "resuming from" in outputs[2].stdout and f"done: {last} steps" in outputs[2].stdout
    steps = [r["step"] for r in run_records(run, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == last  # one record per step, across the resume
    assert (run / "checkpoints" / f"step-{last:07d}" / "model.safetensors").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == last
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one TensorBoard stream across the resume
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def distributed(trained):
    """The torchrun block, run as written after the train block (it uses its my.yaml)."""
    workdir = trained[0]
    env = shell_env(CENTRIFUGE_CACHE=str(workdir / "cache"))
    return [run_command(c, workdir, env, timeout=400) for c in commands(marked("shell", "torchrun"))]


def test_torchrun_block(trained, distributed):
    workdir = trained[0]
    lines = commands(marked("shell", "torchrun"))
    assert all(c.startswith("torchrun ") and "-m centrifuge.cli.main train" in c for c in lines)
    first, last = steps_in(lines[0]), steps_in(lines[1])
    out_dir = re.search(r"train\.out_dir=(\S+)", lines[0]).group(1)
    assert f"train.out_dir={out_dir}" in lines[1] and "--resume" in lines[1]
    ranks = int(re.search(r"--nproc-per-node (\d+)", lines[0]).group(1))
    start, resume = (d.stdout for d in distributed)
    assert f"distributed: {ranks} ranks (fsdp2)" in start and start.count(f"done: {first} steps") == 1
    assert "resuming from" in resume and resume.count(f"done: {last} steps") == 1  # rank 0 alone prints
    run = workdir / out_dir
    assert [r["step"] for r in run_records(run, "train")][-1] == last
    # The same config and steps as the train block's one-process run: the same batches, the same held-out loss.
    one = run_records(trained[1], "eval")[-1]
    assert run_records(run, "eval")[-1]["loss"] == pytest.approx(one["loss"], rel=1e-4) and one["step"] == last
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["distributed"] == "fsdp2"
    assert (run / "checkpoints" / f"step-{last:07d}" / "model.safetensors").is_file()


def tensorboard_runs(command: str, cwd: Path, env: dict[str, str], want: set[str]) -> tuple[set[str], str]:
    """Start ``tensorboard --logdir ...`` as typed, read its list of runs over HTTP (at the address it prints:
    6006, or the next free port) until ``want`` shows or a minute passed, stop it; returns the runs it listed
    and its output."""
    server = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in server.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None and seen != want:
            time.sleep(0.5)
            address = re.search(r"TensorBoard \S+ at (http://\S+?)/? ", "".join(lines))
            if not address:
                continue
            try:
                with urllib.request.urlopen(f"{address.group(1)}/data/runs", timeout=5) as reply:
                    seen = set(json.load(reply))
            except OSError:
                continue
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server this test started, and its children
        server.wait(timeout=30)
        reader.join(timeout=30)
    return seen, "".join(lines)


def test_plot_block(trained, distributed):
    workdir = trained[0]
    env = shell_env(CENTRIFUGE_CACHE=str(workdir / "cache"))
    overlay, every, board = commands(marked("shell", "plot"))
    out = re.search(r"--out (\S+)", overlay).group(1)
    done = run_command(overlay, workdir, env)
    named = re.findall(r"\b(runs/compare/\w+)", overlay)
    assert len(named) >= 2 and f"wrote {out} ({len(named)} runs: {', '.join(named)})" in done.stdout
    assert (workdir / out).read_bytes()[:4] == b"\x89PNG"
    (workdir / out).unlink()

    runs = sorted(f"runs/{p.name}" for p in (workdir / "runs").iterdir() if (p / "metrics.jsonl").is_file())
    assert len(runs) == 2, runs  # the train block's run and the torchrun block's, not compare/ (runs inside)
    done = run_command(every, workdir, env)
    assert f"wrote compare.png (2 runs: {', '.join(runs)})" in done.stdout
    assert (workdir / "compare.png").read_bytes()[:4] == b"\x89PNG"

    assert board.split("#")[0].split() == ["tensorboard", "--logdir", "runs/"]
    want = {f"{run.removeprefix('runs/')}/tb" for run in runs}  # one stream per run, the resumed ones too
    seen, output = tensorboard_runs(board, workdir, env, want)
    assert seen == want, f"tensorboard listed {seen}, not {want}:\n{output[-3000:]}"
