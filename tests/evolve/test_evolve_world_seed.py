"""Evaluations of a world's models read that world's splits (issue 14, bug 1), and "uniform" is one
merge everywhere (bug 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import shoal.eval as eval_package
from shoal.errors import ConfigError
from shoal.evolve.baselines import UNIFORM_BASELINE, uniform_recipe
from shoal.evolve.config import parse_evolve_config
from shoal.evolve.run import evolve
from shoal.evolve.scoring import run_task_seed


def _world_with_seed(world, seed: int, where: Path):  # type: ignore[no-untyped-def]
    """A copy of ``world`` whose manifest says it was built with ``seed``."""
    from shoal.zoo import load_zoo

    root = where / f"micro-seed{seed}"
    shutil.copytree(world.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["seed"] = seed
    (root / "manifest.json").write_text(json.dumps(manifest))
    copy = load_zoo("micro", seed, root=root)
    assert copy is not None
    return copy


@pytest.fixture()
def seeds_asked(monkeypatch):  # type: ignore[no-untyped-def]
    """Every (task, seed) that the evaluations ask the task registry for."""
    asked: list[tuple[str, int]] = []
    real = eval_package.get_task

    def spy(name: str, *, seed: int = 0):  # type: ignore[no-untyped-def]
        asked.append((name, seed))
        return real(name, seed=seed)

    monkeypatch.setattr(eval_package, "get_task", spy)
    return asked


def _config(world, **extra):  # type: ignore[no-untyped-def]
    return parse_evolve_config({
        "base_model": str(world.model("base")),
        "models": [str(world.model("lang")), str(world.model("math"))],
        "method": "dare_ties", "space": {"parameters": ["weight"]},
        "fitness": {"task": "math_b", "split": "fitness", "limit": 4},
        "validation": {"task": "math_b", "split": "validation", "limit": 4, "top_k": 1},
        "report": {"tasks": ["math_b"], "split": "test", "limit": 4},
        "search": {"sampler": "random", "trials": 2, "seed": 0}, **extra})


def test_a_seed_1_world_is_searched_and_reported_on_seed_1_splits(micro_world, tmp_path, seeds_asked):  # type: ignore[no-untyped-def]
    world = _world_with_seed(micro_world, 1, tmp_path)
    config = _config(world)
    assert config.task_seed is None and run_task_seed(config) == 1
    result = evolve(config, tmp_path / "run", write_model=False)
    assert result.trials == 2 and {s.model for s in result.scores} >= {"base", "lang", "math", "evolved"}
    assert seeds_asked and {seed for _, seed in seeds_asked} == {1}


def test_the_demo_scores_its_world_on_the_worlds_splits(micro_world, tmp_path, seeds_asked):  # type: ignore[no-untyped-def]
    from shoal.studies.evolve_demo import best_source, demo_config

    world = _world_with_seed(micro_world, 1, tmp_path)
    config = demo_config(world, trials=1, limit=4)
    assert config.task_seed == 1
    assert best_source(config) in config.models
    assert {seed for _, seed in seeds_asked} == {1}


def test_models_of_two_worlds_need_an_explicit_task_seed(micro_world, tmp_path):  # type: ignore[no-untyped-def]
    other = _world_with_seed(micro_world, 1, tmp_path)
    mixed = parse_evolve_config({"base_model": str(micro_world.model("base")),
                                 "models": [str(other.model("lang")), str(micro_world.model("math"))],
                                 "fitness": {"task": "math_b", "split": "fitness"}})
    with pytest.raises(ConfigError, match="different seeds"):
        run_task_seed(mixed)
    assert run_task_seed(mixed.model_copy(update={"task_seed": 0})) == 0


def test_uniform_is_the_demos_uniform_everywhere(micro_world) -> None:  # type: ignore[no-untyped-def]
    recipe = uniform_recipe(_config(micro_world))
    assert UNIFORM_BASELINE == {"density": 0.5, "weight": 1.0}
    assert [entry.parameters for entry in recipe.models] == [UNIFORM_BASELINE, UNIFORM_BASELINE]
    linear = uniform_recipe(_config(micro_world, method="linear", base_model=None))
    assert [entry.parameters for entry in linear.models] == [{"weight": 1.0}, {"weight": 1.0}]
