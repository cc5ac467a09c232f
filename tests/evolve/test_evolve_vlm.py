"""Evolution over a VLM (EvoVLM-JP): per-layer DARE-TIES genes for a LLaVA's language model and an
LLM specialist, candidates merged in memory into a resident LLaVA, the vision tower copied."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.checkpoint import describe_tensor
from shoal.cli.main import cli
from shoal.errors import ConfigError
from shoal.evolve.baselines import output_model, uniform_recipe
from shoal.evolve.candidate import CandidateBuilder, checkpoint_names
from shoal.evolve.config import parse_evolve_config
from shoal.evolve.space import build_space
from tiny_llava import build_llava, build_llm

LLM_TO_VLM = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evo_vlm")
    base = build_llm(root / "base", seed=0)
    return {"base": base, "spec": build_llm(root / "spec", seed=1, base=base, noise=0.05),
            "vlm": build_llava(root / "vlm", base, seed=2, noise=0.05)}


@pytest.fixture(scope="module")
def text_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-only stand-in task in the tiny vocabulary: answer the word after the prompt's last."""
    folder = tmp_path_factory.mktemp("vlm_task")
    for split in ("fitness", "validation", "test"):
        rows = [{"prompt": f"w{i} w{i + 1}", "target": f"w{i + 2}"} for i in range(8)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config_data(trio: dict[str, Path], task: Path, **extra: object) -> dict:
    data = {
        "base_model": {"model": str(trio["base"]), "prefix_map": LLM_TO_VLM},
        "models": [str(trio["vlm"]), {"model": str(trio["spec"]), "prefix_map": LLM_TO_VLM}],
        "method": "dare_ties",
        "space": {"layer_group_size": 1},
        "fitness": {"task": f"jsonl:{task}", "split": "fitness"},
        "validation": {"task": f"jsonl:{task}", "split": "validation", "top_k": 1},
        "report": {"tasks": [f"jsonl:{task}"], "split": "test"},
        "search": {"sampler": "cmaes", "trials": 4, "seed": 0, "population": 4},
        "batch_size": 4,
        "task_seed": 0,
    }
    data.update(extra)
    return data


def test_config_takes_model_entries_with_prefix_maps(trio, text_task) -> None:  # type: ignore[no-untyped-def]
    config = parse_evolve_config(config_data(trio, text_task))
    assert config.models == [str(trio["vlm"]), str(trio["spec"])] and config.base_model == str(trio["base"])
    assert config.prefix_maps == {str(trio["spec"]): LLM_TO_VLM, str(trio["base"]): LLM_TO_VLM}
    assert parse_evolve_config(config.model_dump(mode="json")) == config  # a saved config reloads
    assert output_model(config) == str(trio["vlm"])
    recipe = uniform_recipe(config)
    assert recipe.base_prefix_map == LLM_TO_VLM and recipe.models[1].prefix_map == LLM_TO_VLM
    assert recipe.models[0].prefix_map == {}


@pytest.mark.parametrize(("change", "message"), [
    ({"models": [{"model": "x", "prefx_map": {}}]}, "models[0]: unknown key 'prefx_map'"),
    ({"models": [7]}, "models[0]: a model is a reference"),
    ({"models": [{"model": "x", "prefix_map": {"a.": 1}}]}, "models[0].prefix_map"),
    ({"prefix_maps": {"elsewhere": {}}}, "prefix_maps names ['elsewhere']"),
    ({"kind": "dfs", "base_model": None}, "prefix maps apply to parameter-space"),
])
def test_bad_model_entries_are_config_errors(trio, text_task, change: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        parse_evolve_config(config_data(trio, text_task, **change))
    assert message in str(err.value)


def test_space_has_per_layer_genes_for_the_language_model_only(trio, text_task) -> None:  # type: ignore[no-untyped-def]
    config = parse_evolve_config(config_data(trio, text_task))
    with CandidateBuilder([str(trio["vlm"])]) as builder:
        reader = builder.readers[str(trio["vlm"])]
        space = build_space(config, reader.tensor_names(), reader.config["architectures"][0])
    assert [c.group for c in space.cells] == ["embed", "layer 0", "layer 1", "head"]
    filters = [f for c in space.cells for f in c.filters]
    assert not any(f.startswith(("vision_tower", "multi_modal_projector")) for f in filters)
    assert {g.model for g in space.genes} == {str(trio["vlm"]), str(trio["spec"])}
    assert len(space.genes) == 2 * 2 * 4  # two models x (weight, density) x four cells
    # the VLM-only control: the specialist held at zero, only the VLM's language model re-weighted
    control = parse_evolve_config(config_data(trio, text_task, hold_at_zero=[str(trio["spec"])]))
    with CandidateBuilder([str(trio["vlm"])]) as builder:
        reader = builder.readers[str(trio["vlm"])]
        held = build_space(control, reader.tensor_names(), reader.config["architectures"][0])
    assert {g.model for g in held.genes} == {str(trio["vlm"])}
    recipe = held.decode(held.default_genome())
    assert recipe.models[1].parameters == {"weight": 0.0} and recipe.models[1].prefix_map == LLM_TO_VLM


def test_in_memory_candidate_is_shoal_merge_bitwise_and_keeps_the_vision_tower(trio, text_task, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = parse_evolve_config(config_data(trio, text_task))
    models = [str(trio["base"]), str(trio["vlm"]), str(trio["spec"])]
    with CandidateBuilder(models) as builder:
        reader = builder.readers[str(trio["vlm"])]
        space = build_space(config, reader.tensor_names(), reader.config["architectures"][0])
        rng = random.Random(3)
        genome = {key: rng.random() for key in space.default_genome()}
        recipe = space.decode(genome)
        model = builder.load_model(str(trio["vlm"]))
        assert type(model).__name__ == "LlavaForConditionalGeneration"
        builder.apply(model, recipe, seed=config.seed)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    result = CliRunner().invoke(cli, ["merge", str(path), str(tmp_path / "merged"), "-q"])
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    source = load_file(str(trio["vlm"] / "model.safetensors"))
    params = checkpoint_names(model)
    assert set(merged) <= set(params)
    changed = 0
    for name, tensor in merged.items():
        assert torch.equal(params[name].detach(), tensor), name
        if describe_tensor(name).role == "vision":
            assert torch.equal(tensor, source[name]), name
        else:
            changed += not torch.equal(tensor, source[name])
    assert changed > 10  # the language model did change


def test_short_evolve_run_over_a_vlm_finishes_through_the_cli(trio, text_task, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(config_data(trio, text_task)))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["evolve", str(path), "--run-dir", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    model_dir = run_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (model_dir / "processor_config.json").read_bytes() == (trio["vlm"] / "processor_config.json").read_bytes()
    merged = load_file(str(next(model_dir.glob("*.safetensors"))))
    source = load_file(str(trio["vlm"] / "model.safetensors"))
    assert all(torch.equal(merged[n], source[n]) for n in source if describe_tensor(n).role == "vision")
    best = yaml.safe_load((run_dir / "best_recipe.yaml").read_text())
    assert best["base_prefix_map"] == LLM_TO_VLM
    from transformers import LlavaForConditionalGeneration

    assert isinstance(LlavaForConditionalGeneration.from_pretrained(model_dir), LlavaForConditionalGeneration)
