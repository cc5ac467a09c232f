"""A DFS search that starts in model A's own layers (``search.own_layers_first``): the embedding of
the own-layers genome, the exact stage switch and budget, stage 1 as the own-layers control's
search, stage 2's first trial, resume in either stage, the pick over both stages, bad configs,
and a whole run on the micro world against its own-layers control."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from shoal.evolve.config import parse_evolve_config
from shoal.evolve.dfs_stages import (RECORD_FILE, STAGE_SUFFIX, START_ATTR, completed_trials, embed,
                                     own_layers_space, run_own_layers_first, select_final)
from shoal.evolve.search import default_storage, open_study, run_trials
from shoal.evolve.workers import InProcess
from shoal.flow.genome import DfsLayout, DfsSpace
from run_kill import RecordingFitness, kill_when, two_stage_states
from search_config_cases import assert_search_config_error

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = DfsSpace(DfsLayout(layer_counts=(2, 2), repeats=2, max_hops=5))  # M = 4, T = 8, W 4 x 4
OWN = own_layers_space(SPACE)  # M = 2, T = 4, W 2 x 2
M, B_LAYERS = SPACE.num_layers, range(2, 4)  # model B: global layers 2 and 3


def config(trials: int = 16, first: int | None = 6, sigma0: float | None = None, validation: bool = False):  # type: ignore[no-untyped-def]
    olf: dict = {} if first is None else {"trials": first}
    if sigma0 is not None:
        olf["sigma0"] = sigma0
    data = {"kind": "dfs", "models": ["a", "b"], "dfs": {"repeats": 2, "max_hops": 5},
            "fitness": {"task": "math_b", "split": "fitness"},
            "search": {"sampler": "cmaes", "trials": trials, "seed": 3, "own_layers_first": olf}}
    if validation:
        data["validation"] = {"task": "math_b", "split": "validation", "top_k": 3}
    return parse_evolve_config(data)


def score(genome: dict[str, float]) -> float:
    """A smooth fitness of a full genome that wants model B's first slot on (its optimum is not
    in the own-layers subspace) and every scale gene at 0.6."""
    return -(genome["I3"] - 0.9) ** 2 - sum((v - 0.6) ** 2 for k, v in genome.items() if k.startswith("W")) / 25


class Recorder(RecordingFitness):
    def score(self, genome: dict[str, float]) -> float:
        assert sorted(genome) == sorted(SPACE.keys)  # always a full genome
        return score(genome)


def open_run(tmp_path: Path, cfg):  # type: ignore[no-untyped-def]
    storage = default_storage(tmp_path)
    return storage, open_study(storage, SPACE.keys, cfg.search, resume=True, x0=SPACE.default_genome(),
                               study_name="run")


def complete(study) -> list:  # type: ignore[no-untyped-def]
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def model_b_off(genome: dict[str, float]) -> bool:
    """Every slot of model B off and every scale gene into or out of B's layers at scale 1."""
    slots_off = all(genome[f"I{t}"] < 0.5 for t in range(SPACE.num_slots) if t % M in B_LAYERS)
    one = SPACE.default_genome()["W0.0"]
    scales = all(genome[f"W{i}.{j}"] == one for i in range(M) for j in range(M) if i in B_LAYERS or j in B_LAYERS)
    return slots_off and scales


@pytest.mark.parametrize("counts, scaling", [((3, 2), "matrix"), ((3, 2), "per_slot"), ((2, 4, 3), "matrix")])
def test_an_own_layers_genome_decodes_to_the_same_path_in_the_full_space(counts: tuple, scaling: str) -> None:
    full = DfsSpace(DfsLayout(layer_counts=counts, repeats=3, max_hops=7, scaling=scaling))  # type: ignore[arg-type]
    own = own_layers_space(full)
    assert own.layout.layer_counts == counts[:1] and own.layout.max_hops == 7 and own.layout.scaling == scaling
    rng = random.Random(0)
    for _ in range(200):
        genome = {k: rng.random() for k in own.keys}
        assert full.decode(embed(genome, own, full)) == own.decode(genome)
    assert embed(own.default_genome(), own, full) == full.default_genome()  # the starts agree too


def test_the_stage_switch_the_budget_and_stage_2s_start(tmp_path: Path) -> None:
    cfg = config(trials=12, first=5)
    storage, study = open_run(tmp_path, cfg)
    fitness = Recorder()
    stage1 = run_own_layers_first(study, cfg, SPACE, InProcess(fitness), storage=storage, study_name="run",
                                  run_dir=tmp_path)
    assert stage1.study_name == "run" + STAGE_SUFFIX and sorted(stage1.user_attrs["genes"]) == sorted(OWN.keys)
    assert len(complete(stage1)) == 5 and len(complete(study)) == 7 and len(fitness.seen) == 12
    assert completed_trials(study, storage, "run") == 12
    # stage 1: model B's slots off in every candidate, and the candidates are stage 1's trials embedded
    assert all(model_b_off(g) for g in fitness.seen[:5])
    assert [embed(t.params, OWN, SPACE) for t in complete(stage1)] == fitness.seen[:5]
    # stage 2: its first trial is stage 1's best, then CMA-ES leaves the subspace
    best = sorted(complete(stage1), key=lambda t: (-t.value, t.number))[0]
    x0 = embed(best.params, OWN, SPACE)
    assert fitness.seen[5] == pytest.approx(x0)
    first = min(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert first.user_attrs[START_ATTR] == best.number and first.value == best.value
    assert not all(model_b_off(g) for g in fitness.seen[6:])
    assert study.best_value >= best.value  # the restart can only improve on fitness
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["stage1_trials"] == 5 and record["stage2_trials"] == 7
    assert record["stage2"]["from_stage1_trial"] == best.number and record["stage2"]["fitness"] == best.value
    assert record["stage2"]["x0"] == pytest.approx(x0) and record["stage2"]["sigma0"] == pytest.approx(1 / 6)
    assert record["stage1"]["started"] <= record["stage2"]["started"]
    assert record["stage2"]["path"] == [[h.model, h.layer, h.scale] for h in SPACE.decode(x0)]


def test_stage_1_is_the_own_layers_controls_search_and_the_default_split_is_half(tmp_path: Path) -> None:
    cfg = config(trials=10, first=None, sigma0=0.05)
    storage, study = open_run(tmp_path, cfg)
    stage1 = run_own_layers_first(study, cfg, SPACE, InProcess(Recorder()), storage=storage, study_name="run",
                                  run_dir=tmp_path)
    assert len(complete(stage1)) == 5 and len(complete(study)) == 5
    # the control: a one-stage search over model A alone, same seed and start, same fitness
    control_cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"own_layers_first": None})})
    (tmp_path / "c").mkdir()
    control = open_study(default_storage(tmp_path / "c"), OWN.keys, control_cfg.search, resume=False,
                         x0=OWN.default_genome(), study_name="control")
    run_trials(control, OWN.keys, InProcess(lambda g: (score(embed(g, OWN, SPACE)), {})), 5)
    assert [t.params for t in complete(control)] == [t.params for t in complete(stage1)]
    assert json.loads((tmp_path / RECORD_FILE).read_text())["stage2"]["sigma0"] == 0.05


@pytest.mark.parametrize("stop_after", [2, 7])  # inside stage 1; inside stage 2
def test_an_interrupted_run_resumes_into_the_right_stage(tmp_path: Path, stop_after: int) -> None:
    cfg = config(trials=10, first=4)
    storage, study = open_run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        run_own_layers_first(study, cfg, SPACE, InProcess(Recorder(stop_after)), storage=storage,
                             study_name="run", run_dir=tmp_path)
    started = json.loads((tmp_path / RECORD_FILE).read_text())
    storage, study = open_run(tmp_path, cfg)  # a new process opens the run again
    fitness = Recorder()
    stage1 = run_own_layers_first(study, cfg, SPACE, InProcess(fitness), storage=storage, study_name="run",
                                  run_dir=tmp_path)
    assert len(complete(stage1)) == 4 and len(complete(study)) == 6
    assert len(fitness.seen) == 10 - stop_after  # nothing done twice, nothing skipped
    failed = [t for s in (stage1, study) for t in s.get_trials(deepcopy=False) if t.state.name == "FAIL"]
    assert len(failed) == 1  # the interrupted candidate, re-run rather than counted
    best = sorted(complete(stage1), key=lambda t: (-t.value, t.number))[0]
    starts = [t for t in study.get_trials(deepcopy=False) if START_ATTR in t.user_attrs]
    assert len(starts) == 1 and starts[0].number == 0 and starts[0].user_attrs[START_ATTR] == best.number
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["stage1"]["started"] == started["stage1"]["started"]
    if "stage2" in started:  # killed inside stage 2: its start is kept
        assert record["stage2"]["started"] == started["stage2"]["started"]
        assert record["stage2"]["x0"] == started["stage2"]["x0"]


def test_the_final_pick_ranges_over_both_stages_and_counts_a_genome_once(tmp_path: Path) -> None:
    cfg = config(trials=10, first=5, validation=True)
    storage, study = open_run(tmp_path, cfg)
    stage1 = run_own_layers_first(study, cfg, SPACE, InProcess(Recorder()), storage=storage, study_name="run",
                                  run_dir=tmp_path)
    stage1_genomes = [embed(t.params, OWN, SPACE) for t in complete(stage1)]
    asked: list[dict[str, float]] = []

    def validation(genome, task, split, limit):  # type: ignore[no-untyped-def]
        asked.append(dict(genome))  # stage 1's genomes score high on validation, stage 2's low
        return SimpleNamespace(score=1.0 + score(genome) if genome in stage1_genomes else -1.0)

    evaluator = SimpleNamespace(config=cfg, space=SPACE, score_genome=validation)
    genome, fitness, value = select_final(evaluator, study, storage=storage, study_name="run", run_dir=tmp_path)
    assert len(asked) == 3 and all(a != b for i, a in enumerate(asked) for b in asked[:i])  # no genome twice
    assert genome in stage1_genomes and value == max(1.0 + score(g) for g in asked if g in stage1_genomes)
    final = json.loads((tmp_path / RECORD_FILE).read_text())["final"]
    assert final["stage"] == 1 and len(final["candidates"]) == 3


@pytest.mark.parametrize("search, change, words", [
    ({"trials": 10, "own_layers_first": {"trials": 10}}, {"kind": "dfs"}, "search.own_layers_first.trials (10)"),
    ({"trials": 1, "own_layers_first": {}}, {"kind": "dfs"}, "search.own_layers_first.trials (0)"),
    ({"trials": 10, "own_layers_first": {"trials": 0}}, {"kind": "dfs"}, "own_layers_first.trials"),
    ({"trials": 10, "sampler": "tpe", "own_layers_first": {}}, {"kind": "dfs"}, "search.sampler is 'tpe'"),
    ({"trials": 10, "own_layers_first": {"sigma0": -1}}, {"kind": "dfs"}, "own_layers_first.sigma0"),
    ({"trials": 10, "own_layers_first": {"steps": 3}}, {"kind": "dfs"}, "unknown key 'steps'"),
    ({"trials": 10, "own_layers_first": {}}, {}, "search.own_layers_first"),  # a ps run
    ({"trials": 10, "own_layers_first": {}, "warm_start": {"trials": 4}}, {}, "search.own_layers_first"),
])
def test_a_bad_own_layers_first_is_a_config_error_naming_the_key(search: dict, change: dict, words: str) -> None:
    assert_search_config_error(search, change, words)


def test_one_model_has_no_second_stage() -> None:
    from shoal.errors import ConfigError

    with pytest.raises(ConfigError, match="search.own_layers_first.*at least two models"):
        parse_evolve_config({"kind": "dfs", "models": ["a"], "fitness": {"task": "math_b", "split": "fitness"},
                             "search": {"trials": 10, "own_layers_first": {}}})


def test_a_run_on_the_micro_world_repeats_its_controls_first_trials(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    from shoal.evolve.run import evolve, load_run_study

    math, lang = str(micro_world.model("math")), str(micro_world.model("lang"))

    def data(models: list[str], search: dict) -> dict:
        return {"kind": "dfs", "models": models, "dfs": {"repeats": 2, "max_hops": 5},
                "fitness": {"task": "math_b", "split": "fitness", "limit": 12},
                "validation": {"task": "math_b", "split": "validation", "limit": 8, "top_k": 2},
                "report": {"tasks": ["math_b"], "split": "test", "limit": 8},
                "search": {"sampler": "cmaes", "trials": 6, "seed": 1, **search}, "batch_size": 16}

    run_dir = tmp_path / "staged"
    result = evolve(parse_evolve_config(data([math, lang], {"own_layers_first": {"trials": 3}})), run_dir,
                    write_model=False)
    control = evolve(parse_evolve_config(data([math], {})), tmp_path / "control", write_model=False)
    assert result.trials == 6 and json.loads((run_dir / "scores.json").read_text())["trials"] == 6
    storage = default_storage(run_dir)
    stage1 = optuna.load_study(study_name=load_run_study(run_dir).study_name + STAGE_SUFFIX, storage=storage)
    control_trials = sorted(complete(load_run_study(tmp_path / "control")), key=lambda t: t.number)[:3]
    # the own-layers stage asks for the control's candidates and scores them the same over math + lang
    assert [(t.params, t.value) for t in complete(stage1)] == [(t.params, t.value) for t in control_trials]
    study = load_run_study(run_dir)
    best = max(complete(stage1), key=lambda t: (t.value, -t.number))
    assert min(study.trials, key=lambda t: t.number).value == best.value
    assert study.best_value >= best.value and control.trials == 6
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert record["final"]["fitness"] == result.best_fitness and record["stage2"]["fitness"] == best.value


def _stage_states(db: Path) -> dict[str, list[str]]:
    return two_stage_states(db, STAGE_SUFFIX, "own", "all")


def test_kill_9_inside_stage_2_then_resume_meets_the_budget(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    import yaml

    trials, first = 6, 2
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump({
        "kind": "dfs", "models": [str(micro_world.model("math")), str(micro_world.model("lang"))],
        "dfs": {"repeats": 2, "max_hops": 5},
        "fitness": {"task": "math_b", "split": "fitness", "limit": 12},
        "validation": {"task": "math_b", "split": "validation", "limit": 8, "top_k": 2},
        "report": {"tasks": ["math_b"], "split": "test", "limit": 8},
        "search": {"sampler": "cmaes", "trials": trials, "seed": 0, "own_layers_first": {"trials": first}},
        "batch_size": 16}))
    run_dir = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "shoal.cli.main", "evolve", str(config_path), "--run-dir", str(run_dir),
            "-q", "--no-model"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    def ready() -> bool:  # stage 2 under way, one of its trials running
        states = _stage_states(run_dir / "study.db")["all"]
        return states.count("COMPLETE") >= 1 and states[-1:] == ["RUNNING"]

    kill_when(process, ready, "stage 2", poll=0.02)
    started = json.loads((run_dir / RECORD_FILE).read_text())
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    states = _stage_states(run_dir / "study.db")
    assert states["own"].count("COMPLETE") == first and states["all"].count("COMPLETE") == trials - first
    assert states["own"].count("FAIL") + states["all"].count("FAIL") == 1  # the killed trial, re-run
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert record["stage2"]["started"] == started["stage2"]["started"] and record["stage2"]["x0"] == started["stage2"]["x0"]
    from shoal.evolve.run import load_run_study

    study = load_run_study(run_dir)
    assert len([t for t in study.trials if START_ATTR in t.user_attrs]) == 1
    assert json.loads((run_dir / "scores.json").read_text())["trials"] == trials and "final" in record
