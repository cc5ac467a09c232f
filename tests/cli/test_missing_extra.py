"""A command that needs an optional package which is not installed names the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = """
import sys
sys.modules["diffusers"] = None  # as if the diffusion extra were not installed
from shoal.cli.main import main
main(["zoo", "build", "--kind", "diffusion", "--size", "micro", "--out", sys.argv[1], "-q"])
"""


def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "world"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                            timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: this command needs diffusers, which is not installed: pip install 'shoal[diffusion]'"], \
        result.stderr
    assert not out.exists() and not list(tmp_path.glob(".world.staging-*"))
