"""``shoal demo`` end to end on the micro world (tiny budgets)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from shoal.cli.main import cli

STAGES = ["world build: pretrain base", "grid search (uniform DARE-TIES)", "best source (validation)",
          "control search (best source alone)", "control search: validation pick", "main search",
          "main search: validation pick", "report: test scores", "report: fitness curves"]


def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--size", "micro", "--out", str(out), "--trials", "2",
                                      "--limit", "8"])
    assert result.exit_code == 0, result.output
    for label in ["math", "lang", "uniform dare_ties", "best uniform grid point", "single-source control",
                  "evolved"]:
        assert label in result.stdout
    # stdout is not a terminal here: the table is printed whole, never cut at 80 columns
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 9 and all(line.endswith("|") for line in rows) and max(map(len, rows)) > 80
    # ... and stderr gets one line when each stage starts and one when it ends, in order
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in result.stderr.splitlines()]
    for stage in STAGES:
        assert any(line.startswith(f"{stage}: started") for line in lines), (stage, lines)
        assert any(re.match(re.escape(stage) + r": done \d+/\d+ in ", line) for line in lines), (stage, lines)
    firsts = [next(i for i, line in enumerate(lines) if line.startswith(f"{stage}: started")) for stage in STAGES]
    assert firsts == sorted(firsts)
    data = json.loads((out / "demo.json").read_text())
    assert {s["model"] for s in data["scores"]} >= {"evolved", "base"}
    assert all(s["n"] == 500 for s in data["scores"])  # test scores always use the whole split
    assert (out / "evolved" / "report.html").exists() and (out / "fitness_runs.png").exists()
    assert '<img src="../fitness_runs.png"' in (out / "evolved" / "report.html").read_text()
    assert (out / "control" / "best_recipe.yaml").exists()
