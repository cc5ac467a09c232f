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

optuna.logging.set_verbosity(optuna.logging.WARNING)

# two models x two parameters x three cells, keyed as shoal.evolve.space keys them
FINE_KEYS = [f"m{m}.c{c}.{p}" for p in ("weight", "density") for m in (0, 1) for c in range(3)]


def config(trials: int = 20, warm: int = 8, sigma0: float = 0.1, **search: object):  # type: ignore[no-untyped-def]
    return parse_evolve_config({
        "base_model": "base", "models": ["a", "b"], "space": {"layer_group_size": 1},
        "fitness": {"task": "math_b", "split": "fitness"},
        "search": {"sampler": "cmaes", "trials": trials, "seed": 0,
                   "warm_start": {"trials": warm, "sampler": "tpe", "sigma0": sigma0}, **search}})


class Recorder:
    """A fitness over genomes (a smooth bump) that records what it was asked, in order."""

    def __init__(self, stop_after: int | None = None):
        self.seen: list[dict[str, float]] = []
        self.stop_after = stop_after

    def __call__(self, genome: dict[str, float]) -> tuple[float, dict]:
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise KeyboardInterrupt
        self.seen.append(dict(genome))
        value = -sum((v - (0.2 if k.startswith("m0") else 0.7)) ** 2 for k, v in genome.items())
        return value, {}


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
])
def test_a_bad_warm_start_is_a_config_error_naming_the_key(change: dict, words: str) -> None:
    search: dict = {"sampler": change.get("sampler", "cmaes"), "trials": 20,
                    "warm_start": {"trials": change.get("warm", 8), "sigma0": change.get("sigma0_ws", 0.1)}}
    if "sigma0" in change:
        search["sigma0"] = change["sigma0"]
    if "extra" in change:
        search["warm_start"]["steps"] = 3
    data = {"models": ["a", "b"], "space": {"layer_group_size": change.get("layer_group_size", 1)},
            "fitness": {"task": "math_b", "split": "fitness"}, "search": search}
    if change.get("kind") == "dfs":
        data.update(kind="dfs", space={"layer_group_size": 1})
    else:
        data["base_model"] = "base"
    with pytest.raises(ConfigError) as err:
        parse_evolve_config(data, where="cfg.yaml")
    assert words in str(err.value) and str(err.value).startswith("cfg.yaml")
