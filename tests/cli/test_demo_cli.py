"""``shoal demo --json`` and ``--threads`` (the real run is tests/evolve/test_evolve_demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import shoal.studies.evolve_demo as evolve_demo
from shoal.cli.main import cli
from shoal.evolve.run import EvolveResult, Score
from shoal.studies.evolve_demo import DemoResult


def test_demo_json_and_threads(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen = {}
    scores = (Score("evolved", "math_b", "test", 0.4, 500, 0.02), Score("base", "math_b", "test", 0.03, 500, 0.01))

    def fake_run_demo(**kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs, threads=torch.get_num_threads())
        kwargs["progress"]("main search", 1, 1)
        run = EvolveResult(run_dir=tmp_path, genome={}, description="", best_fitness=0.5, best_validation=0.45,
                           trials=3, model_dir=None, scores=scores)
        return DemoResult(out=tmp_path, scores=scores, evolved=run, control=run,
                          grid_best={"density": 0.9, "weight": 1.5})

    monkeypatch.setattr(evolve_demo, "run_demo", fake_run_demo)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = CliRunner().invoke(cli, ["demo", "--size", "micro", "--out", str(tmp_path), "--json"])
        assert result.exit_code == 0, result.output
        assert seen["threads"] == 1  # one torch thread per evaluation process unless told otherwise
        data = json.loads(result.stdout)
        assert data["scores"][0] == {"model": "evolved", "task": "math_b", "split": "test", "score": 0.4, "n": 500,
                                     "stderr": 0.02}
        assert data["grid_best"] == {"density": 0.9, "weight": 1.5} and data["trials"] == 3
        assert data["report"] == str(tmp_path / "evolved" / "report.html")
        assert "main search: started" in result.stderr  # progress stays on stderr
        quiet = CliRunner().invoke(cli, ["demo", "--size", "micro", "--out", str(tmp_path), "--json", "-q",
                                         "--threads", "2"])
        assert quiet.stderr == "" and seen["threads"] == 2
    finally:
        torch.set_num_threads(before)
