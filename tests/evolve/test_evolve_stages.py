"""Coarse-to-fine search (``search.warm_start``): the stage switch, the per-layer CMA-ES's start,
the exact budget, resume in either stage, and bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from shoal.errors import ConfigError
from shoal.evolve.config import parse_evolve_config
from shoal.evolve.search import default_storage, open_study
from shoal.evolve.stages import STAGE_SUFFIX, WARM_START_FILE, coarse_key, expand, run_staged
from shoal.evolve.workers import InProcess
from run_kill import RecordingFitness, kill_when, two_stage_states
from search_config_cases import assert_search_config_error

optuna.logging.set_verbosity(optuna.logging.WARNING)

# two models x two parameters x three cells, keyed as shoal.evolve.space keys them
FINE_KEYS = [f"m{m}.c{c}.{p}" for p in ("weight", "density") for m in (0, 1) for c in range(3)]


def config(trials: int = 20, warm: int = 8, sigma0: float = 0.1, **search: object):  # type: ignore[no-untyped-def]
    return parse_evolve_config({
        "base_model": "base", "models": ["a", "b"], "space": {"layer_group_size": 1},
        "fitness": {"task": "math_b", "split": "fitness"},
        "search": {"sampler": "cmaes", "trials": trials, "seed": 0,
                   "warm_start": {"trials": warm, "sampler": "tpe", "sigma0": sigma0}, **search}})


class Recorder(RecordingFitness):
    """A smooth bump over genomes that records what it was asked, in order."""

    def score(self, genome: dict[str, float]) -> float:
        return -sum((v - (0.2 if k.startswith("m0") else 0.7)) ** 2 for k, v in genome.items())


def studies(tmp_path: Path, cfg):  # type: ignore[no-untyped-def]
    storage = default_storage(tmp_path)
    return storage, open_study(storage, FINE_KEYS, cfg.search, resume=True, study_name="run")


def complete(study) -> list:  # type: ignore[no-untyped-def]
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def test_the_stage_switch_the_start_point_and_the_budget(tmp_path: Path) -> None:
    cfg = config(trials=20, warm=8, sigma0=1e-4)
    storage, study = studies(tmp_path, cfg)
    fitness = Recorder()
    coarse = run_staged(study, cfg, FINE_KEYS, InProcess(fitness), storage=storage, study_name="run",
                        run_dir=tmp_path)
    assert coarse.study_name == "run" + STAGE_SUFFIX
    assert len(complete(coarse)) == 8 and len(complete(study)) == 12  # exact: 8 + 12 = 20
    assert len(fitness.seen) == 20
    # the first 8 candidates are uniform per model: every cell of a model shares its value
    for genome in fitness.seen[:8]:
        for key, value in genome.items():
            assert value == genome[f"{key.split('.')[0]}.c0.{key.split('.')[2]}"]
    # they are the coarse trials' genomes, expanded
    assert [expand(t.params, FINE_KEYS) for t in complete(coarse)] == fitness.seen[:8]
    best = max(complete(coarse), key=lambda t: (t.value, -t.number))
    x0 = expand(best.params, FINE_KEYS)
    assert set(best.params) == {"m0.weight", "m1.weight", "m0.density", "m1.density"}
    # stage 2 starts at the best coarse point: its first trial, then CMA-ES around it
    assert fitness.seen[8] == pytest.approx(x0)
    assert fitness.seen[9] != fitness.seen[8]
    for genome in fitness.seen[9:]:  # sigma0 = 1e-4: every sample sits at the mean
        assert genome == pytest.approx(x0, abs=5e-3)
    record = json.loads((tmp_path / WARM_START_FILE).read_text())
    assert record["from_warm_start_trial"] == best.number and record["fitness"] == best.value
    assert record["x0"] == pytest.approx(x0) and record["per_layer_trials"] == 12


def test_a_larger_step_leaves_the_start_and_improves_on_it(tmp_path: Path) -> None:
    cfg = config(trials=40, warm=10, sigma0=0.1)
    storage, study = studies(tmp_path, cfg)
    run_staged(study, cfg, FINE_KEYS, InProcess(Recorder()), storage=storage, study_name="run",
               run_dir=tmp_path)
    start = json.loads((tmp_path / WARM_START_FILE).read_text())["fitness"]
    assert study.best_value >= start
    assert max(abs(v - s) for t in complete(study)[1:]
               for v, s in zip(t.params.values(), complete(study)[0].params.values())) > 0.02


def test_a_source_the_warm_start_switched_off_keeps_its_values_in_stage_2(tmp_path: Path) -> None:
    cfg = config(trials=24, warm=10, sigma0=0.1)
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={
        "warm_start": cfg.search.warm_start.model_copy(update={"drop_below": 0.5})})})
    ranges = {k: ((0.0, 2.0) if k.endswith("weight") else (0.0, 1.0)) for k in FINE_KEYS}
    storage, study = studies(tmp_path, cfg)
    fitness = Recorder()  # its optimum: m0's genes at 0.2 (weight 0.19), m1's at 0.7
    run_staged(study, cfg, FINE_KEYS, InProcess(fitness), storage=storage, study_name="run",
               run_dir=tmp_path, ranges=ranges)
    record = json.loads((tmp_path / WARM_START_FILE).read_text())
    from shoal.flow.genes import to_range

    m0_weight = to_range(record["coarse_genome"]["m0.weight"], 0.0, 2.0)
    m1_weight = to_range(record["coarse_genome"]["m1.weight"], 0.0, 2.0)
    assert record["dropped_models"] == [tag for tag, w in (("m0", m0_weight), ("m1", m1_weight)) if w <= 0.5]
    assert record["dropped_models"] == ["m0"], (m0_weight, m1_weight)
    assert record["searched_genes"] == 6
    for genome in fitness.seen[10:]:  # stage 2: m0's genes stay where the warm start put them
        assert {k: v for k, v in genome.items() if k.startswith("m0")} == \
            {k: v for k, v in record["x0"].items() if k.startswith("m0")}
    assert len({genome["m1.c0.weight"] for genome in fitness.seen[10:]}) > 5  # m1's are searched
    assert len(complete(study)) == 14


@pytest.mark.parametrize("stop_after", [3, 11])  # inside the warm start; inside the per-layer stage
def test_an_interrupted_run_resumes_into_the_right_stage(tmp_path: Path, stop_after: int) -> None:
    cfg = config(trials=20, warm=8)
    storage, study = studies(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        run_staged(study, cfg, FINE_KEYS, InProcess(Recorder(stop_after)), storage=storage,
                   study_name="run", run_dir=tmp_path)
    storage, study = studies(tmp_path, cfg)  # a new process opens the run again
    fitness = Recorder()
    coarse = run_staged(study, cfg, FINE_KEYS, InProcess(fitness), storage=storage, study_name="run",
                        run_dir=tmp_path)
    assert len(complete(coarse)) == 8 and len(complete(study)) == 12
    assert len(fitness.seen) == 20 - stop_after  # nothing done twice, nothing skipped
    failed = [t for s in (coarse, study) for t in s.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1  # the interrupted candidate, re-run rather than counted
    x0 = json.loads((tmp_path / WARM_START_FILE).read_text())["x0"]
    best = max(complete(coarse), key=lambda t: (t.value, -t.number))
    assert x0 == pytest.approx(expand(best.params, FINE_KEYS))
    first = min(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert first.params == pytest.approx(x0)  # the start point is trial 0 of stage 2, once


def test_coarse_keys_follow_the_space_keys() -> None:
    assert coarse_key("m1.c4.density") == "m1.density" and coarse_key("g.c0.lambda") == "g.lambda"
    with pytest.raises(ConfigError, match="I3"):
        coarse_key("I3")


@pytest.mark.parametrize("change, words", [
    ({"warm": 20}, "warm_start.trials (20)"),
    ({"warm": 0}, "warm_start.trials"),
    ({"sampler": "tpe"}, "search.sampler is 'tpe'"),
    ({"sigma0": 0.2}, "search.sigma0 and warm_start"),
    ({"sigma0_ws": -1.0}, "warm_start.sigma0"),
    ({"layer_group_size": None}, "search.warm_start"),
    ({"kind": "dfs"}, "search.warm_start"),
    ({"extra": 1}, "unknown key 'steps'"),
    ({"drop": -0.5}, "warm_start.drop_below"),
])
def test_a_bad_warm_start_is_a_config_error_naming_the_key(change: dict, words: str) -> None:
    search: dict = {"sampler": change.get("sampler", "cmaes"), "trials": 20,
                    "warm_start": {"trials": change.get("warm", 8), "sigma0": change.get("sigma0_ws", 0.1)}}
    if "sigma0" in change:
        search["sigma0"] = change["sigma0"]
    if "drop" in change:
        search["warm_start"]["drop_below"] = change["drop"]
    if "extra" in change:
        search["warm_start"]["steps"] = 3
    assert_search_config_error(search, change, words)


# -- a whole run on the micro world: kill -9 in either stage, then --resume ------------------

def _stage_states(db: Path) -> dict[str, list[str]]:
    return two_stage_states(db, STAGE_SUFFIX, "warm", "fine")


@pytest.mark.parametrize("stage", ["warm", "fine"])
def test_kill_9_in_either_stage_then_resume_meets_the_budget(tmp_path: Path, micro_world, stage: str) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    import yaml

    from shoal.evolve.run import load_run_study
    from shoal.evolve.stages import open_coarse_study

    trials, warm = 8, 4
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump({
        "base_model": str(micro_world.model("base")),
        "models": [str(micro_world.model("lang")), str(micro_world.model("math"))],
        "space": {"layer_group_size": 1, "parameters": ["weight", "density"]},
        "fitness": {"task": "math_b", "split": "fitness", "limit": 16},
        "validation": {"task": "math_b", "split": "validation", "limit": 8, "top_k": 2},
        "report": {"tasks": ["math_b"], "split": "test", "limit": 8},
        "search": {"sampler": "cmaes", "trials": trials, "seed": 0, "warm_start": {"trials": warm}},
        "batch_size": 32,
    }))
    run_dir = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "shoal.cli.main", "evolve", str(config_path), "--run-dir", str(run_dir),
            "-q", "--no-model"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    def ready() -> bool:  # a few trials into the stage, one of them running
        states = _stage_states(run_dir / "study.db")[stage]
        return states.count("COMPLETE") >= (2 if stage == "warm" else 1) and states[-1:] == ["RUNNING"]

    kill_when(process, ready, f"stage {stage} under way")
    killed = _stage_states(run_dir / "study.db")
    assert killed[stage].count("COMPLETE") < (warm if stage == "warm" else trials - warm)
    assert (run_dir / WARM_START_FILE).exists() == (stage == "fine")

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    states = _stage_states(run_dir / "study.db")
    assert states["warm"].count("COMPLETE") == warm and states["fine"].count("COMPLETE") == trials - warm
    assert states["warm"].count("FAIL") + states["fine"].count("FAIL") == 1  # the killed trial, re-run
    study = load_run_study(run_dir)
    from shoal.evolve.config import load_evolve_config

    coarse = open_coarse_study(f"sqlite:///{run_dir / 'study.db'}", study.study_name, list(study.trials[0].params),
                               load_evolve_config(config_path).search)
    done = [t for t in coarse.trials if t.state.name == "COMPLETE"]
    best = sorted(done, key=lambda t: (-t.value, t.number))[0]
    record = json.loads((run_dir / WARM_START_FILE).read_text())
    assert record["from_warm_start_trial"] == best.number
    first = min(study.trials, key=lambda t: t.number)
    assert first.params == pytest.approx(expand(best.params, list(first.params))) == record["x0"]
    assert len([t for t in study.trials if t.user_attrs.get("warm_start") is not None]) == 1
    assert json.loads((run_dir / "scores.json").read_text())["trials"] == trials
