"""`shoal evolve` start failures are found before anything is written, a live run folder is
locked, and evaluators run with the thread count asked for (issues 18, 19 and 14)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from shoal.cli.main import cli
from shoal.evolve.config import parse_evolve_config
from shoal.evolve.lock import LOCK_FILE
from shoal.evolve.run import load_run_study, search

LIMIT = 16
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def config_data(world, trials: int = 3, **extra: object) -> dict:  # type: ignore[no-untyped-def]
    data = {
        "base_model": str(world.model("base")),
        "models": [str(world.model("lang")), str(world.model("math"))],
        "method": "dare_ties",
        "space": {"layer_group_size": 1},
        "fitness": {"task": "math_b", "split": "fitness", "limit": LIMIT},
        "validation": {"task": "math_b", "split": "validation", "limit": LIMIT, "top_k": 1},
        "report": {"tasks": ["math_b"], "split": "test", "limit": LIMIT},
        "search": {"sampler": "random", "trials": trials, "seed": 0},
        "batch_size": 32,
    }
    data.update(extra)
    return data


def cli_args(config: Path, run_dir: Path, *more: str) -> list[str]:
    return ["evolve", str(config), "--run-dir", str(run_dir), "-q", "--no-model", *more]


def states(run_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in load_run_study(run_dir).get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def completed_soon(run_dir: Path) -> int:
    """Completed trials of a run that may not have created its study yet (0 until it has), read
    without Optuna: opening an Optuna storage creates its tables, racing the run that does."""
    db = run_dir / "study.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def edit(data: dict, path: str, value: object) -> dict:
    """``data`` with the dotted key ``path`` set to ``value`` (a copy)."""
    out = yaml.safe_load(yaml.safe_dump(data))
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


BAD_CONFIGS = [  # (dotted key, bad value, words the one line must hold)
    ("method", "dare_tie", ["method", "dare_tie"]),
    ("fitness.task", "math_bb", ["fitness.task", "math_bb", "known tasks"]),
    ("validation.task", "math_bx", ["validation.task", "math_bx"]),
    ("report.tasks", ["math_b", "lang_x"], ["report.tasks", "lang_x"]),
    ("search.trials", -3, ["search.trials"]),
    ("search.population", 1, ["search.population"]),
    ("search.sigma0", 0, ["search.sigma0"]),
    ("space.ranges", {"weight": [1.0, 0.5]}, ["weight", "low < high"]),
    ("space.ranges", {"weight": [0.0, float("inf")]}, ["weight", "finite"]),
    ("space.ranges", {"densty": [0.0, 1.0]}, ["densty"]),
    ("space.parameters", ["weight", "normalize"], ["normalize", "cannot evolve"]),
    ("fixed", {"lambdaa": 1.0}, ["fixed", "lambdaa"]),
    ("fixed", {"lambda": True}, ["fixed.lambda", "number"]),
    ("models", ["/nonexistent/lang", "MATH"], ["models[0]", "/nonexistent/lang"]),
    ("base_model", "zoo:nosuchsize/base", ["base_model", "nosuchsize"]),
    ("threads", 0, ["threads"]),
    ("search.warm_start", {"trials": 3}, ["search", "warm_start.trials (3)", "search.trials (3)"]),
    ("search.warm_start", {"trials": 1}, ["search", "warm_start", "search.sampler is 'random'"]),
    ("search.warm_start", {"trials": 1, "stages": 2}, ["search.warm_start", "unknown key 'stages'"]),
]


@pytest.mark.parametrize("key,value,words", BAD_CONFIGS, ids=[f"{k}={v}" for k, v, _ in BAD_CONFIGS])
def test_a_bad_config_is_one_line_and_writes_nothing(tmp_path: Path, micro_world, key, value, words) -> None:  # type: ignore[no-untyped-def]
    data = config_data(micro_world)
    if value == ["/nonexistent/lang", "MATH"]:
        value = ["/nonexistent/lang", str(micro_world.model("math"))]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(edit(data, key, value)))
    result = CliRunner().invoke(cli, cli_args(config, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--trials", "--workers", "--threads"])
def test_a_bad_count_flag_is_named(tmp_path: Path, micro_world, flag: str) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_data(micro_world)))
    result = CliRunner().invoke(cli, cli_args(config, tmp_path / "run", flag, "-3"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {flag} must be at least 1, got -3"]
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_the_folder_as_it_was_and_the_rerun_works(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    """A failure found only after the folder was locked and the models opened (a storage URL
    that cannot be opened) removes what the start wrote; a stale lock of a dead process is
    taken over with a note, and the corrected rerun into the same folder runs the budget."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_data(micro_world, trials=2)))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, cli_args(config, run_dir, "--storage", "nosuchdb://x/y"))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "nosuchdb://x/y" in result.stderr
    assert not run_dir.exists()
    # a folder that holds the lock file of a killed run (its process gone)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(f"{dead.pid}\n")
    rerun = subprocess.run([sys.executable, "-m", "shoal.cli.main", *cli_args(config, run_dir, "--trials", "2")],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"took over the lock of process {dead.pid}, which is no longer running" in rerun.stderr
    assert "Loading weights" not in rerun.stderr
    assert states(run_dir) == {"COMPLETE": 2}
    assert not (run_dir / LOCK_FILE).exists()  # a finished run releases its folder


def test_a_second_resume_of_a_live_run_is_refused(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    """Two real processes on one folder: the second is refused while the first lives and
    touches nothing; once the first is killed (kill -9), its lock is taken over with a note."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_data(micro_world, trials=200)))
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", *cli_args(config, run_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 300
        while completed_soon(run_dir) < 1:
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.time() < deadline, "the first run completed no trial in 300 s"
            time.sleep(0.5)
        second = subprocess.run([sys.executable, "-m", "shoal.cli.main", *cli_args(config, run_dir, "--resume")],
                                capture_output=True, text=True, env=ENV, timeout=300)
        assert first.poll() is None, "the first run ended before the second asked"
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: {run_dir} is in use: process {first.pid} is running this search; wait for it to finish "
            "or stop it before resuming"]
        assert "FAIL" not in states(run_dir)  # the refused process marked no running trial failed
    finally:
        first.kill()
        first.wait()
    done = completed_soon(run_dir)
    third = subprocess.run([sys.executable, "-m", "shoal.cli.main",
                            *cli_args(config, run_dir, "--resume", "--trials", str(done))],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert third.returncode == 0, third.stderr
    assert f"took over the lock of process {first.pid}, which is no longer running" in third.stderr
    assert states(run_dir).get("COMPLETE") == done
    assert not (run_dir / LOCK_FILE).exists()


def test_evaluators_use_the_threads_asked_for_and_the_caller_keeps_its_own(tmp_path: Path, micro_world,
                                                                           monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from shoal.evolve import evaluators

    seen: list[int] = []
    real = evaluators.Evaluator.fitness

    def recording(self, genome):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real(self, genome)

    monkeypatch.setattr(evaluators.Evaluator, "fitness", recording)
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    for threads, run in ((None, "default"), (wanted, "asked")):
        extra = {} if threads is None else {"threads": threads}
        config = parse_evolve_config(config_data(micro_world, trials=2, **extra))
        evaluator, study = search(config, tmp_path / run)
        evaluator.close()
        expected = 1 if threads is None else wanted
        assert seen == [expected, expected]
        assert [t.user_attrs["threads"] for t in study.trials] == [expected, expected]
        assert torch.get_num_threads() == before  # never left changed in the calling process
        seen.clear()


def test_evolve_json_prints_one_object_for_scripts(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    """`shoal evolve --json`: stdout is one JSON object (scores, fitness, trials, report path)."""
    import json

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_data(micro_world, trials=2)))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, cli_args(config, run_dir, "--json"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["trials"] == 2 and record["report"] == str(run_dir / "report.html")
    assert record["scores"] and {"model", "task", "score", "n", "stderr"} <= set(record["scores"][0])


@pytest.mark.parametrize("content, message", [
    (b"models: [a]\nmethod: ties\nmodels: [b]\n", "key 'models' appears twice"),
    (b"method: t\xe9s\n", "not a UTF-8 text file"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested"),
    (b"method: !!python/object/apply:os.system [ls]\n", "refused YAML tag"),
])
def test_a_malformed_config_file_is_one_line_and_writes_nothing(tmp_path: Path, content: bytes,
                                                                  message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, cli_args(config, run_dir))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not run_dir.exists()
