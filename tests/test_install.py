"""The README's install-from-a-wheel instructions build the wheel they name, with its config and command."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_wheel_builds_with_the_default_config_and_the_command(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    build = re.search(r"^pip wheel (.*) -w dist \.$", readme, re.M)
    wheel = re.search(r'^pip install "dist/([^"\[]+\.whl)', readme, re.M)
    assert build and wheel, "the README's wheel instructions moved"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", *build.group(1).split(), "-w", str(tmp_path),
                          str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    built = tmp_path / wheel.group(1)
    assert built.is_file(), sorted(p.name for p in tmp_path.iterdir())
    with zipfile.ZipFile(built) as zf:
        names = set(zf.namelist())
        assert "centrifuge/configs/default.yaml" in names and "centrifuge/cli/main.py" in names
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "centrifuge = centrifuge.cli.main:main" in zf.read(entry).decode()
