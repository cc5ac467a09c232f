"""Evolution runs on the micro world: outputs, resume after kill -9, failed candidates,
the test-split guard, local workers and Ray."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from shoal.cli.main import cli
from shoal.errors import ConfigError
from shoal.evolve.config import parse_evolve_config
from shoal.evolve.run import CONFIG_FILE, evolve, load_run_study, search

LIMIT = 24


def config_data(world, trials: int = 6, sampler: str = "cmaes", **extra: object) -> dict:  # type: ignore[no-untyped-def]
    data = {
        "base_model": str(world.model("base")),
        "models": [str(world.model("lang")), str(world.model("math"))],
        "method": "dare_ties",
        "space": {"layer_group_size": 1},
        "fitness": {"task": "math_b", "split": "fitness", "limit": LIMIT},
        "validation": {"task": "math_b", "split": "validation", "limit": LIMIT, "top_k": 2},
        "report": {"tasks": ["math_b", "math_a"], "split": "test", "limit": LIMIT},
        "search": {"sampler": sampler, "trials": trials, "seed": 0},
        "batch_size": 32,
    }
    data.update(extra)
    return data


def trial_states(run_dir: Path) -> list[str]:
    """The trials' states in number order, read without Optuna: opening an Optuna storage
    creates its tables, racing the run that does, and is too slow to catch a running trial."""
    db = run_dir / "study.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return [row[0] for row in connection.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:
        return []


def complete(study) -> list:  # type: ignore[no-untyped-def]
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def test_full_run_writes_recipe_model_and_report(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    config = parse_evolve_config(config_data(micro_world, trials=5))
    result = evolve(config, tmp_path / "run")
    run = tmp_path / "run"
    assert result.trials == 5
    for name in ["best_recipe.yaml", "report.html", "fitness.png", "genome.png", "scores.json", "study.db",
                 CONFIG_FILE]:
        assert (run / name).exists(), name
    assert AutoModelForCausalLM.from_pretrained(run / "model") is not None
    labels = {s.model for s in result.scores}
    assert {"base", "lang", "math", "uniform dare_ties", "evolved"} <= labels
    assert all(s.split == "test" and s.n == LIMIT for s in result.scores)
    # the best recipe is an ordinary recipe that shoal merge accepts
    out = tmp_path / "again"
    merged = CliRunner().invoke(cli, ["merge", str(run / "best_recipe.yaml"), str(out), "-q"])
    assert merged.exit_code == 0, merged.output
    html = (run / "report.html").read_text()
    assert "evolved" in html and "n=24" in html


def test_test_split_is_refused(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    bad = config_data(micro_world)
    bad["fitness"] = {"task": "math_b", "split": "test"}
    with pytest.raises(ConfigError, match="never see the test split"):
        parse_evolve_config(bad)
    bad = config_data(micro_world)
    bad["validation"] = {"task": "math_b", "split": "test"}
    with pytest.raises(ConfigError, match="validation"):
        parse_evolve_config(bad)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config_data(micro_world) | {"fitness": {"task": "math_b", "split": "test"}}))
    result = CliRunner().invoke(cli, ["evolve", str(path), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "test split" in result.stderr
    assert not (tmp_path / "r").exists()


def test_failed_candidates_are_recorded_and_the_run_goes_on(tmp_path: Path, micro_world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import optuna

    from shoal.evolve import evaluators as run_module

    real = run_module.Evaluator.fitness
    calls = {"n": 0}

    def flaky(self, genome):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise FloatingPointError("merged tensor contains NaN")
        return real(self, genome)

    monkeypatch.setattr(run_module.Evaluator, "fitness", flaky)
    config = parse_evolve_config(config_data(micro_world, trials=4, sampler="random"))
    evaluator, study = search(config, tmp_path / "run")
    evaluator.close()
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 2
    assert all("NaN" in t.user_attrs["error"] for t in failed)
    assert len(complete(study)) == 4


def test_resume_after_kill_9_loses_and_repeats_nothing(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    import optuna

    from shoal.evolve.search import INTERRUPTED

    trials = 14
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config_data(micro_world, trials=trials)))
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "shoal.cli.main", "evolve", str(config_path), "--run-dir", str(run_dir),
            "-q", "--no-model"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 480
    while time.time() < deadline:
        time.sleep(0.05)
        states = trial_states(run_dir)
        if states.count("COMPLETE") >= 3 and states[-1:] == ["RUNNING"]:  # a candidate is being evaluated
            break
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    else:
        proc.kill()
        pytest.fail("the run did not complete 3 trials within 480 s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = complete(load_run_study(run_dir))
    assert 3 <= len(before) < trials
    killed = [t.number for t in load_run_study(run_dir).trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(killed) == 1
    snapshot = {t.number: (t.value, t.params) for t in before}
    result = CliRunner().invoke(cli, ["evolve", str(config_path), "--run-dir", str(run_dir), "-q",
                                      "--resume", "--no-model"])
    assert result.exit_code == 0, result.output
    study = load_run_study(run_dir)
    after = complete(study)
    assert len(after) == trials
    for trial in after:
        if trial.number in snapshot:
            assert (trial.value, trial.params) == snapshot[trial.number]
    assert set(snapshot) <= {t.number for t in after}
    # the killed trial is failed as interrupted and its budget slot is run again
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == killed and failed[0].user_attrs["error"] == INTERRUPTED
    assert len(study.trials) == trials + 1
    # a fresh start on the same folder without --resume is refused, and the study is kept
    again = CliRunner().invoke(cli, ["evolve", str(config_path), "--run-dir", str(run_dir), "-q"])
    assert again.exit_code == 2 and "--resume" in again.stderr


def test_two_local_workers_share_one_study(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    config = parse_evolve_config(config_data(micro_world, trials=6, sampler="random"))
    evaluator, study = search(config, tmp_path / "run", workers=2)
    evaluator.close()
    done = complete(study)
    assert len(done) == 6 and len(study.trials) == 6  # exactly the budget, never one more
    assert len({tuple(sorted(t.params.items())) for t in done}) == 6  # no worker repeats another


def test_ray_local_cluster(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray")
    config = parse_evolve_config(config_data(micro_world, trials=4, sampler="random"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        evaluator, study = search(config, tmp_path / "run", workers=2, executor="ray")
        evaluator.close()
    finally:
        ray.shutdown()
    assert len(complete(study)) == 4 and len(study.trials) == 4
