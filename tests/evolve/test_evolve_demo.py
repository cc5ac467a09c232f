"""``shoal demo`` end to end on the micro world (tiny budgets)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from shoal.cli.main import cli


def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--size", "micro", "--out", str(out), "--trials", "2",
                                      "--limit", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    for label in ["math", "lang", "uniform dare_ties", "best uniform grid point", "single-source control",
                  "evolved"]:
        assert label in result.stdout
    data = json.loads((out / "demo.json").read_text())
    assert {s["model"] for s in data["scores"]} >= {"evolved", "base"}
    assert all(s["n"] == 500 for s in data["scores"])  # test scores always use the whole split
    assert (out / "evolved" / "report.html").exists() and (out / "fitness_runs.png").exists()
    assert (out / "control" / "best_recipe.yaml").exists()
