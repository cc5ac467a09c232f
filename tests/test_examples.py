"""The example recipes and configs in examples/ are valid and plan on the micro world."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from shoal.checkpoint import open_checkpoint
from shoal.evolve.config import parse_evolve_config
from shoal.merge.plan import plan_merge
from shoal.merge.recipe import parse_recipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def on_micro(text: str, world) -> str:  # type: ignore[no-untyped-def]
    """The example with its zoo:small models replaced by the micro world's folders."""
    for name in world.models:
        text = text.replace(f"zoo:small/{name}", str(world.model(name)))
    return text


@pytest.mark.parametrize("name", ["ties_zoo.yaml", "ties_gradient.yaml", "slerp_gradient.yaml",
                                  "frankenmerge.yaml"])
def test_example_recipes_plan(name: str, micro_world) -> None:  # type: ignore[no-untyped-def]
    text = on_micro((EXAMPLES / name).read_text(), micro_world)
    if name == "frankenmerge.yaml":  # the micro world has 2 layers, the small one 4
        text = text.replace("[0, 4]", "[0, 2]").replace("[2, 4]", "[1, 2]")
    recipe = parse_recipe(yaml.safe_load(text), where=name)
    with ExitStack() as stack:
        readers = {m: stack.enter_context(open_checkpoint(m)) for m in recipe.source_models()}
        plan = plan_merge(recipe, readers)
    assert plan.ops


@pytest.mark.parametrize("name", ["evolve_cross.yaml", "evolve_dfs.yaml", "evolve_psdfs.yaml",
                                  "evolve_multitask.yaml"])
def test_example_evolve_configs_are_valid(name: str, micro_world) -> None:  # type: ignore[no-untyped-def]
    text = on_micro((EXAMPLES / name).read_text(), micro_world)
    config = parse_evolve_config(yaml.safe_load(text), where=name)
    assert config.fitness.split == "fitness" and config.search.sampler == "cmaes"


def test_evolve_cross_is_the_demo_setup(micro_world) -> None:  # type: ignore[no-untyped-def]
    """``shoal evolve examples/evolve_cross.yaml`` searches what ``shoal demo`` searches: the same
    config apart from the model paths and the task seed (which the example takes from its
    models' world, and the demo names)."""
    from shoal.studies.evolve_demo import demo_config

    text = on_micro((EXAMPLES / "evolve_cross.yaml").read_text(), micro_world)
    example = parse_evolve_config(yaml.safe_load(text), where="evolve_cross.yaml").model_dump()
    demo = demo_config(micro_world, trials=120, limit=None, seed=0).model_dump()
    assert demo.pop("task_seed") == micro_world.seed and example.pop("task_seed") is None
    assert example == demo
    assert example["fixed"] == {"normalize": False}
