"""The portfolio search (``search.portfolio``): stage switches at exact trial counts, each
restart's CMA-ES mean at its start point, the exact budget, the shared trials as history,
resume in every stage, the pick over every stage, and bad configs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from shoal.evolve.config import parse_evolve_config
from shoal.evolve.portfolio import (HISTORY_ATTR, PORTFOLIO_FILE, START_ATTR, completed_trials, plan,
                                    run_portfolio, select_final, shared_key)
from shoal.evolve.search import default_storage, open_study, run_trials
from shoal.evolve.workers import InProcess
from run_kill import RecordingFitness, kill_when, study_states
from search_config_cases import assert_search_config_error

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINE_KEYS = [f"m{m}.c{c}.{p}" for p in ("weight", "density") for m in (0, 1) for c in range(3)]
SHARED, PER_SOURCE, MIDDLE = 5, 4, 6  # restart 1 ("best") takes the rest


def config(trials: int = 22, sigma_middle: float | None = 1e-4, sigma_best: float | None = 1e-4,
           validation: bool = False):  # type: ignore[no-untyped-def]
    data = {
        "base_model": "base", "models": ["a", "b"], "space": {"layer_group_size": 1},
        "fitness": {"task": "math_b", "split": "fitness"},
        "search": {"sampler": "cmaes", "trials": trials, "seed": 0, "portfolio": {
            "shared_trials": SHARED, "per_source_trials": PER_SOURCE, "sampler": "tpe",
            "restarts": [{"start": "middle", "trials": MIDDLE, "sigma0": sigma_middle},
                         {"start": "best", "sigma0": sigma_best}]}}}
    if validation:
        data["validation"] = {"task": "math_b", "split": "validation", "top_k": 3}
    return parse_evolve_config(data)


def bump(genome: dict[str, float]) -> float:
    """A smooth fitness whose optimum is not uniform: m0's genes at 0.2, m1's at 0.7."""
    return -sum((v - (0.2 if k.startswith("m0") else 0.7)) ** 2 for k, v in genome.items())


class Recorder(RecordingFitness):
    """The bump as a fitness, recording what it was asked in order; raises after ``stop_after``."""

    def score(self, genome: dict[str, float]) -> float:
        return bump(genome)


def open_run(tmp_path: Path, cfg):  # type: ignore[no-untyped-def]
    storage = default_storage(tmp_path)
    return storage, open_study(storage, FINE_KEYS, cfg.search, resume=True, study_name="run")


def complete(study) -> list:  # type: ignore[no-untyped-def]
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def run(tmp_path: Path, cfg, fitness: Recorder):  # type: ignore[no-untyped-def]
    storage, study = open_run(tmp_path, cfg)
    done = run_portfolio(study, cfg, FINE_KEYS, InProcess(fitness), storage=storage, study_name="run",
                         run_dir=tmp_path)
    return storage, study, done


def test_stages_switch_at_exact_counts_and_each_restart_starts_at_its_point(tmp_path: Path) -> None:
    cfg = config(trials=22)
    fitness = Recorder()
    storage, study, done = run(tmp_path, cfg, fitness)
    assert [(s.label, s.study_name) for s, _ in done] == [
        ("shared", "run.shared"), ("per-source", "run.per-source"),
        ("restart 0 (middle)", "run.restart-0"), ("restart 1 (best)", "run")]
    assert len(fitness.seen) == 22 == completed_trials(study, cfg, storage, "run")  # exact budget
    shared, per_source, middle, best = fitness.seen[:5], fitness.seen[5:9], fitness.seen[9:15], fitness.seen[15:]
    assert len(best) == 22 - SHARED - PER_SOURCE - MIDDLE
    for genome in shared:  # every model and layer share one value per parameter
        assert all(v == genome[f"m0.c0.{k.split('.')[2]}"] for k, v in genome.items())
    for genome in per_source:  # one value per model and parameter
        assert all(v == genome[f"{k.split('.')[0]}.c0.{k.split('.')[2]}"] for k, v in genome.items())
    assert len({(g["m0.c0.weight"], g["m1.c0.weight"]) for g in per_source}) == PER_SOURCE
    assert any(g["m0.c0.weight"] != g["m1.c0.weight"] for g in per_source)  # it leaves the diagonal
    # restart 0: its first trial is the middle, and with a step of 1e-4 every sample sits at the mean
    assert middle[0] == {k: 0.5 for k in FINE_KEYS}
    for genome in middle[1:]:
        assert genome == pytest.approx({k: 0.5 for k in FINE_KEYS}, abs=5e-3)
    # restart 1: the best trial of the stages before it (restart 0 included), then CMA-ES around it
    before = fitness.seen[:15]
    x0 = max(before, key=bump)
    assert best[0] == pytest.approx(x0)
    for genome in best[1:]:
        assert genome == pytest.approx(x0, abs=5e-3)
    record = json.loads((tmp_path / PORTFOLIO_FILE).read_text())
    stages = record["stages"]
    assert [s["trials"] for s in stages] == [5, 4, 6, 7]
    assert stages[1]["history_trials"] == SHARED
    assert stages[2]["start"] == "middle" and stages[2]["sigma0"] == 1e-4 and stages[2]["seed"] == 0
    assert stages[3]["start"] == "best" and stages[3]["x0"] == pytest.approx(x0) and stages[3]["seed"] == 1
    assert stages[3]["fitness"] == pytest.approx(bump(x0))
    # each restart's start point is trial 0 of its study, marked as the start, once
    for (_, s), where in zip(done[2:], ("middle", "best")):
        marked = [t for t in s.trials if START_ATTR in t.user_attrs]
        assert [(t.number, t.user_attrs[START_ATTR]) for t in marked] == [(0, where)]


def test_the_shared_trials_are_history_of_the_per_source_stage_not_evaluated_again(tmp_path: Path) -> None:
    cfg = config(trials=22)
    fitness = Recorder()
    _, _, done = run(tmp_path, cfg, fitness)
    (_, shared), (_, per_source) = done[0][0:2], done[1][0:2]
    history = [t for t in complete(per_source) if HISTORY_ATTR in t.user_attrs]
    assert len(history) == SHARED and len(complete(per_source)) == SHARED + PER_SOURCE
    for copy in history:
        original = shared.trials[copy.user_attrs[HISTORY_ATTR]]
        assert copy.value == original.value
        assert copy.params == {f"m{m}.{p}": original.params[p] for m in (0, 1) for p in ("weight", "density")}


def test_the_shared_stage_asks_for_the_uniform_search_candidates(tmp_path: Path) -> None:
    """Same sampler and seed, genes named and ordered as the uniform search's: same candidates."""
    cfg = config(trials=22)
    fitness = Recorder()
    (tmp_path / "p").mkdir()
    run(tmp_path / "p", cfg, fitness)
    uniform = open_study(default_storage(tmp_path), ["density", "weight"],
                         cfg.search.model_copy(update={"sampler": "tpe", "portfolio": None}), resume=False,
                         study_name="uniform")
    asked: list[dict[str, float]] = []

    def uniform_fitness(genome: dict[str, float]) -> tuple[float, dict]:
        asked.append(genome)
        return bump({k: genome[shared_key(k)] for k in FINE_KEYS}), {}

    run_trials(uniform, ["density", "weight"], InProcess(uniform_fitness), SHARED)
    assert [{k: g[f"m0.c0.{k}"] for k in ("density", "weight")} for g in fitness.seen[:SHARED]] == asked


@pytest.mark.parametrize("stop_after", [2, 7, 11, 18])  # in shared, per-source, restart 0, restart 1
def test_an_interrupted_run_resumes_into_the_right_stage(tmp_path: Path, stop_after: int) -> None:
    cfg = config(trials=22, sigma_middle=0.1, sigma_best=0.1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, cfg, Recorder(stop_after))
    first = json.loads((tmp_path / PORTFOLIO_FILE).read_text())["stages"]
    fitness = Recorder()
    storage, study, done = run(tmp_path, cfg, fitness)  # a new process opens the run again
    assert len(fitness.seen) == 22 - stop_after  # nothing done twice, nothing skipped
    assert completed_trials(study, cfg, storage, "run") == 22
    assert [len([t for t in complete(s) if HISTORY_ATTR not in t.user_attrs]) for _, s in done] == [5, 4, 6, 7]
    failed = [t for _, s in done for t in s.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1  # the interrupted candidate, re-run rather than counted
    stages = json.loads((tmp_path / PORTFOLIO_FILE).read_text())["stages"]
    for before, after in zip(first, stages):  # a restart that had started keeps its start point
        assert before.get("x0") == after.get("x0")
    for _, s in done[2:]:
        marked = [t for t in s.trials if START_ATTR in t.user_attrs and t.state.name == "COMPLETE"]
        assert len(marked) == 1 and marked[0].params == pytest.approx(
            stages[2 if s.study_name.endswith("restart-0") else 3]["x0"])
    assert len([t for t in complete(done[1][1]) if HISTORY_ATTR in t.user_attrs]) == SHARED  # copied once


def test_the_final_pick_ranges_over_every_stage(tmp_path: Path) -> None:
    """The top-k fitness trials of all stages are scored on validation; the best of them wins,
    whichever stage it came from."""
    cfg = config(trials=22, sigma_middle=0.1, sigma_best=0.1, validation=True)
    storage, study, done = run(tmp_path, cfg, Recorder())
    rows = sorted(((t.value, label, t.number, s.label) for label, (s, st) in enumerate(done)
                   for t in complete(st) if HISTORY_ATTR not in t.user_attrs),
                  key=lambda r: (-r[0], r[1], r[2]))[:3]
    # validation prefers the third of the top 3 on fitness
    target = rows[2]

    def score_genome(genome, task, split, limit):  # type: ignore[no-untyped-def]
        return SimpleNamespace(score=1.0 if bump(genome) == pytest.approx(target[0]) else 0.0)

    evaluator = SimpleNamespace(config=cfg, gene_keys=FINE_KEYS, score_genome=score_genome)
    genome, fitness, validation = select_final(evaluator, study, storage=storage, study_name="run",
                                               run_dir=tmp_path)
    assert fitness == target[0] and validation == 1.0 and bump(genome) == pytest.approx(target[0])
    final = json.loads((tmp_path / PORTFOLIO_FILE).read_text())["final"]
    assert (final["stage"], final["trial"]) == (target[3], target[2]) and len(final["candidates"]) == 3


def test_plan_gives_the_open_restart_what_is_left() -> None:
    cfg = config(trials=40)
    assert [(s.kind, s.trials) for s in plan(cfg.search, "x")] == [
        ("shared", 5), ("per-source", 4), ("restart", 6), ("restart", 25)]


@pytest.mark.parametrize("change, words", [
    ({"trials": 14}, "restarts[1].trials is null"),
    ({"best_trials": 3}, "is 18, not search.trials (22)"),
    ({"middle_trials": None}, "restarts[1].trials: only one restart"),
    ({"sampler": "tpe"}, "search.sampler is 'tpe'"),
    ({"sigma0": 0.2}, "search.sigma0 and search.portfolio"),
    ({"warm_start": {"trials": 3}}, "search.portfolio and search.warm_start"),
    ({"start": "centre"}, "search.portfolio.restarts.0.start"),
    ({"restarts": []}, "search.portfolio.restarts"),
    ({"shared_trials": -1}, "search.portfolio.shared_trials"),
    ({"sigma_best": 0.0}, "search.portfolio.restarts.1.sigma0"),
    ({"layer_group_size": None}, "search.portfolio"),
    ({"kind": "dfs"}, "search.portfolio"),
    ({"extra": 1}, "unknown key 'steps'"),
])
def test_a_bad_portfolio_is_a_config_error_naming_the_key(change: dict, words: str) -> None:
    portfolio: dict = {"shared_trials": change.get("shared_trials", 5), "per_source_trials": 4, "restarts": [
        {"start": change.get("start", "middle"), "trials": change.get("middle_trials", 6)},
        {"start": "best", "sigma0": change.get("sigma_best", 0.2), "trials": change.get("best_trials")}]}
    if "restarts" in change:
        portfolio["restarts"] = change["restarts"]
    if "extra" in change:
        portfolio["steps"] = 3
    search: dict = {"sampler": change.get("sampler", "cmaes"), "trials": change.get("trials", 22),
                    "portfolio": portfolio}
    for key in ("sigma0", "warm_start"):
        if key in change:
            search[key] = change[key]
    assert_search_config_error(search, change, words)


# -- a whole run on the micro world: kill -9 inside a restart, then --resume -------------------

def test_kill_9_inside_a_restart_then_resume_meets_the_budget(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    import yaml

    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump({
        "base_model": str(micro_world.model("base")),
        "models": [str(micro_world.model("lang")), str(micro_world.model("math"))],
        "space": {"layer_group_size": 1, "parameters": ["weight", "density"]},
        "fitness": {"task": "math_b", "split": "fitness", "limit": 16},
        "validation": {"task": "math_b", "split": "validation", "limit": 8, "top_k": 2},
        "report": {"tasks": ["math_b"], "split": "test", "limit": 8},
        "search": {"sampler": "cmaes", "trials": 10, "seed": 0, "portfolio": {
            "shared_trials": 2, "per_source_trials": 2,
            "restarts": [{"start": "middle", "trials": 4}, {"start": "best", "sigma0": 0.2}]}},
        "batch_size": 32,
    }))
    run_dir = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "shoal.cli.main", "evolve", str(config_path), "--run-dir", str(run_dir),
            "-q", "--no-model"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    def ready() -> bool:  # two trials into restart 0, one of them running
        states = study_states(run_dir / "study.db")
        mine = next((v for k, v in states.items() if k.endswith(".restart-0")), [])
        return mine.count("COMPLETE") >= 2 and mine[-1:] == ["RUNNING"]

    kill_when(process, ready, "restart 0")
    x0 = json.loads((run_dir / PORTFOLIO_FILE).read_text())["stages"][2]["x0"]
    assert x0 == {k: 0.5 for k in x0}
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    states = study_states(run_dir / "study.db")
    by_stage = {name.rsplit(".", 1)[-1] if "." in name else "last": v for name, v in states.items()}
    counts = {k: v.count("COMPLETE") for k, v in by_stage.items()}
    # per-source holds its 2 trials and the shared stage's 2 as history
    assert counts == {"shared": 2, "per-source": 4, "restart-0": 4, "last": 2}, counts
    assert sum(v.count("FAIL") for v in states.values()) == 1  # the killed trial, re-run
    record = json.loads((run_dir / PORTFOLIO_FILE).read_text())
    assert record["stages"][2]["x0"] == x0 and record["stages"][3]["start"] == "best"
    assert record["final"]["stage"] in [s["stage"] for s in record["stages"]]
    assert json.loads((run_dir / "scores.json").read_text())["trials"] == 10
