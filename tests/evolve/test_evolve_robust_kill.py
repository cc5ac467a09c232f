"""kill -9 of a `shoal evolve --workers 2` coordinator: its evaluator processes die with it,
nothing writes the study afterwards, and `--resume` re-runs the killed trials and stops at
exactly the budget (issues 18 and 14)."""

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

from shoal.evolve.run import load_run_study
from shoal.evolve.search import INTERRUPTED

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def trial_states(run_dir: Path) -> list[str]:
    """The trials' states in number order, read without Optuna (whose storage would create the
    tables while the run does)."""
    db = run_dir / "study.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return [row[0] for row in connection.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:
        return []


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_coordinator_takes_its_workers_and_resume_meets_the_budget(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    trials = 8
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(micro_world.model("base")),
        "models": [str(micro_world.model("lang")), str(micro_world.model("math"))],
        "method": "dare_ties",
        "space": {"layer_group_size": 1},
        "fitness": {"task": "math_b", "split": "fitness", "limit": 24},
        "validation": {"task": "math_b", "split": "validation", "limit": 16, "top_k": 1},
        "report": {"tasks": ["math_b"], "split": "test", "limit": 16},
        "search": {"sampler": "cmaes", "trials": trials, "seed": 0},
        "batch_size": 32,
    }))
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "shoal.cli.main", "evolve", str(config), "--run-dir", str(run_dir),
            "-q", "--no-model", "--workers", "2"]
    coordinator = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 400
        while True:  # until a trial is done and both workers are evaluating
            states = trial_states(run_dir)
            if states.count("COMPLETE") >= 1 and states.count("RUNNING") == 2:
                break
            assert coordinator.poll() is None, coordinator.stderr.read() if coordinator.stderr else ""
            assert time.time() < deadline, f"no trial completed in 400 s: {states}"
            time.sleep(0.2)
        workers = [pid for pid in children(coordinator.pid)
                   if "multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert len(workers) >= 2, workers
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in workers):
        assert time.time() < deadline, f"workers {[p for p in workers if alive(p)]} outlived their coordinator"
        time.sleep(0.2)
    killed = trial_states(run_dir)
    time.sleep(2.0)
    assert trial_states(run_dir) == killed  # nobody writes the study after the kill
    assert killed.count("RUNNING") >= 1 and killed.count("COMPLETE") < trials

    study = load_run_study(run_dir)
    first_two = [t.params for t in sorted(study.trials, key=lambda t: t.number)[:2]]
    assert first_two[0] != first_two[1]  # the workers do not draw the same candidates
    before = {t.number: (t.value, t.params) for t in study.trials if t.state.name == "COMPLETE"}

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    # one note (the killed run's lock), and no third-party progress bars under -q
    assert resumed.stderr.strip().splitlines() == [
        f"{run_dir / 'run.lock'}: took over the lock of process {coordinator.pid}, which is no longer running"]
    study = load_run_study(run_dir)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(done) == trials  # the budget counts completed trials, exactly
    assert len(failed) == killed.count("RUNNING")  # the killed ones, re-run rather than counted
    assert all(t.user_attrs["error"] == INTERRUPTED for t in failed)
    assert len(study.trials) == trials + len(failed)  # and nothing beyond the budget
    for trial in done:
        if trial.number in before:
            assert (trial.value, trial.params) == before[trial.number]
        assert trial.user_attrs["threads"] == 1
