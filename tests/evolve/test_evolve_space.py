"""Search spaces: gene transforms, genome <-> recipe round trips, cells, in-memory candidates."""

from __future__ import annotations

import math
import random
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.checkpoint import describe_tensor, open_checkpoint
from shoal.cli.main import cli
from shoal.errors import ConfigError
from shoal.evolve.candidate import CandidateBuilder
from shoal.evolve.config import parse_evolve_config
from shoal.evolve.space import build_space, from_range, to_range
from shoal.merge.plan import plan_merge
from shoal.merge.recipe import parse_recipe


def test_transform_is_smooth_monotone_and_invertible() -> None:
    assert to_range(0.0, 0.2, 1.4) == pytest.approx(0.2)
    assert to_range(1.0, 0.2, 1.4) == pytest.approx(1.4)
    assert to_range(0.5, 0.2, 1.4) == pytest.approx(0.8)
    xs = [i / 100 for i in range(101)]
    ys = [to_range(x, 0.0, 1.0) for x in xs]
    assert all(b >= a for a, b in zip(ys, ys[1:]))
    # zero slope at the ends: no kink where a clamp would be
    assert to_range(0.01, 0.0, 1.0) < 0.001
    for x in xs:
        assert from_range(to_range(x, -1.0, 3.0), -1.0, 3.0) == pytest.approx(x, abs=1e-6)
    # outside [0, 1] a gene saturates smoothly rather than leaving the range
    assert to_range(1.3, 0.0, 1.0) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def trio(tiny_model_dir):  # type: ignore[no-untyped-def]
    base = tiny_model_dir("evo_base", "llama", seed=31, num_layers=4)
    a = tiny_model_dir("evo_a", "llama", seed=32, base=base, num_layers=4)
    b = tiny_model_dir("evo_b", "llama", seed=33, base=base, num_layers=4)
    return base, a, b


def config_for(base: Path, a: Path, b: Path, **space: object):  # type: ignore[no-untyped-def]
    return parse_evolve_config({
        "base_model": str(base), "models": [str(a), str(b)], "method": "dare_ties",
        "space": space, "fitness": {"task": "math_b", "split": "fitness"},
    })


def names_of(path: Path) -> list[str]:
    with open_checkpoint(path) as reader:
        return reader.tensor_names()


def expected_cell(name: str, group: int | None, modules: list[str]) -> tuple:
    """The cell a tensor belongs to, worked out by hand from its name."""
    info = describe_tensor(name)
    if group is None:
        return ("all",)
    if info.layer is None:
        return ("embed",) if "embed" in name else ("head",)
    module = "rest"
    if "self_attn" in name and "attention" in modules:
        module = "attention"
    if ".mlp." in name and "mlp" in modules:
        module = "mlp"
    return (info.layer // group, module)


@pytest.mark.parametrize("group, modules", [(None, []), (1, []), (2, []), (1, ["attention", "mlp"])])
def test_every_tensor_gets_its_cells_value(trio, group, modules) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    config = config_for(base, a, b, layer_group_size=group, modules=modules)
    space = build_space(config, names_of(base), "LlamaForCausalLM")
    rng = random.Random(0)
    genome = {g.key: rng.random() for g in space.genes}
    values = space.values(genome)
    recipe = space.decode(genome)
    with ExitStack() as stack:
        readers = {m: stack.enter_context(open_checkpoint(m)) for m in recipe.source_models()}
        plan = plan_merge(recipe, readers)
    # map each hand-computed cell to the value genes gave it, and check every op agrees
    seen: dict[tuple, dict[str, tuple]] = {}
    for op in plan.ops:
        cell = expected_cell(op.name, group, modules)
        params = dict(op.params)
        got = {"weight": params["weight"], "density": params["density"]}
        if cell in seen:
            assert seen[cell] == got, op.name  # one value per cell
        seen[cell] = got
    cells_by_gene = {}
    for gene in space.genes:
        for prefix in gene.cell.filters:
            op = next(o for o in plan.ops if prefix in o.name)
            model_index = [str(a), str(b)].index(gene.model)
            assert dict(op.params)[gene.param][model_index] == pytest.approx(values[gene.key])
            cells_by_gene[gene.key] = expected_cell(op.name, group, modules)
    # distinct cells are distinct genes
    n_cells = len({expected_cell(o.name, group, modules) for o in plan.ops})
    assert len(space.genes) == n_cells * 2 * 2  # cells x models x (weight, density)


def test_genome_recipe_round_trip_through_yaml(trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    space = build_space(config_for(base, a, b, layer_group_size=1, modules=["mlp"]), names_of(base), None)
    rng = random.Random(1)
    genome = {g.key: rng.random() for g in space.genes}
    text = space.decode(genome).to_yaml()
    recipe = parse_recipe(yaml.safe_load(text))
    back = space.encode(recipe)
    assert back.keys() == genome.keys()
    for key in genome:
        assert back[key] == pytest.approx(genome[key], abs=1e-6)


def test_space_errors_name_the_problem(trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    with pytest.raises(ConfigError, match="no parameter"):
        build_space(config_for(base, a, b, parameters=["weight", "t"]), names_of(base), None)
    with pytest.raises(ConfigError, match="not an evolved parameter"):
        build_space(config_for(base, a, b, ranges={"gamma": [0, 1]}), names_of(base), None)


def test_in_memory_candidate_equals_shoal_merge(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    base, a, b = trio
    config = config_for(base, a, b, layer_group_size=2)
    space = build_space(config, names_of(base), None)
    rng = random.Random(2)
    genome = {g.key: rng.random() for g in space.genes}
    recipe = space.decode(genome)
    with CandidateBuilder([str(base), str(a), str(b)]) as builder:
        state = builder.state_dict(recipe, seed=5)
        model = builder.load_model(str(base))
        builder.apply(model, recipe, seed=5)
        # a second candidate in the same resident model, then back: no state leaks between them
        builder.apply(model, space.decode(space.default_genome()), seed=5)
        builder.apply(model, recipe, seed=5)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(path), str(out), "-q", "--seed", "5"])
    assert result.exit_code == 0, result.output
    on_disk = load_file(out / "model.safetensors")
    assert on_disk.keys() == state.keys()
    for name in state:
        assert torch.equal(on_disk[name], state[name]), name
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert math.isfinite(float(model(ids).logits.sum()))
