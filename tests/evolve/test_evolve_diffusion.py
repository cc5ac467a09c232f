"""Per-block search over text-to-image pipelines: groups, in-memory candidates, CMA-ES, uniform control."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from shoal.errors import ConfigError
from shoal.evolve.diffusion_search import PipelineCandidates, evolve_blocks, uniform_search
from shoal.evolve.diffusion_space import (UNET_REST, block_space, tensor_groups, text_group,
                                          weights_recipe)


def _pipe(seed: int):
    from shoal.zoo.diffusion_models import (DRAWING_SIZES, assemble_pipeline, drawing_tokenizer,
                                            new_scheduler, new_text_encoder, new_unet, new_vae)

    torch.manual_seed(seed)
    size = DRAWING_SIZES["micro"]
    tokenizer = drawing_tokenizer()
    return assemble_pipeline(unet=new_unet(size), text_encoder=new_text_encoder(size, tokenizer),
                             vae=new_vae(size), tokenizer=tokenizer, scheduler=new_scheduler())


def _finetune(pipe, seed: int, scale: float = 0.05):
    other = copy.deepcopy(pipe)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (other.unet, other.text_encoder):
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def pipes():
    base = _pipe(0)
    return base, {"lang": _finetune(base, 1), "fast": _finetune(base, 2)}


def test_every_tensor_has_a_group_in_block_numbering(pipes):
    base, _ = pipes
    unet, text = base.unet.state_dict(), base.text_encoder.state_dict()
    groups = tensor_groups(unet, text)
    assert len(groups) == len(unet) + len(text)
    assert groups[("unet", "conv_in.weight")] == "IN00"
    assert groups[("unet", "mid_block.resnets.0.conv1.weight")] == "M00"
    assert groups[("unet", "time_embedding.linear_1.weight")] == UNET_REST
    assert groups[("unet", "conv_out.weight")].startswith("OUT")
    assert text_group("text_model.encoder.layers.0.mlp.fc1.weight") == "te_layer0"
    assert text_group("encoder.layers.1.mlp.fc1.weight") == "te_layer1"
    assert text_group("text_model.embeddings.token_embedding.weight") == "te_embed"
    assert text_group("final_layer_norm.weight") == "te_final"
    space = block_space(unet, text, ("lang", "fast"))
    assert space.groups[0] == "IN00" and "M00" in space.groups and space.groups[-1] == "te_final"
    assert space.size == 2 * len(space.groups)


def test_candidates_are_task_arithmetic_per_group(pipes):
    base, specialists = pipes
    candidates = PipelineCandidates(base, specialists)
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"))
    rng = np.random.default_rng(0)
    weights = {(g.model, g.group): float(rng.uniform(0, 2)) for g in space.genes}
    merged = candidates.apply(weights)
    groups = tensor_groups(base.unet.state_dict(), base.text_encoder.state_dict())
    for component in ("unet", "text_encoder"):
        b = getattr(base, component).state_dict()
        parts = {m: getattr(p, component).state_dict() for m, p in specialists.items()}
        got = getattr(merged, component).state_dict()
        for name in b:
            group = groups[(component, name)]
            expected = b[name] + sum(weights[(m, group)] * (parts[m][name] - b[name]) for m in parts)
            torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6)
    # the resident pipeline is reused: going back to weight 0 gives the base bit for bit
    again = candidates.apply(space.uniform_weights(0.0))
    assert all(torch.equal(again.unet.state_dict()[k], v) for k, v in base.unet.state_dict().items())
    assert again is merged


def test_a_missing_weight_and_a_foreign_specialist_are_refused(pipes):
    base, specialists = pipes
    candidates = PipelineCandidates(base, specialists)
    with pytest.raises(ConfigError, match="no weight for model"):
        candidates.apply({})
    foreign = copy.deepcopy(base)
    foreign.unet.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ConfigError, match="does not match the base"):
        PipelineCandidates(base, {"odd": foreign})


class _Target:
    """A fitness that peaks where every 'lang' group is 1.5 and every 'fast' group 0.5."""

    def __init__(self, candidates, space):
        self.candidates, self.space, self.calls = candidates, space, 0
        self.last = None

    def __call__(self, pipe) -> float:
        self.calls += 1
        base_te = self.candidates._base[("text_encoder", "final_layer_norm.weight")]
        lang = self.candidates._delta["lang"][("text_encoder", "final_layer_norm.weight")]
        got = pipe.text_encoder.state_dict()["final_layer_norm.weight"]
        w = float(((got - base_te) * lang).sum() / (lang * lang).sum())  # about lang's weight
        return -abs(w - 1.5)


def test_cmaes_spends_its_budget_and_improves_on_the_start(pipes):
    base, specialists = pipes
    candidates = PipelineCandidates(base, specialists)
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"))
    fitness = _Target(candidates, space)
    start = fitness(candidates.apply(space.weights([0.5] * space.size)))
    fitness.calls = 0
    trace = evolve_blocks(candidates, space, fitness, fitness, evaluations=40, population=8, seed=0)
    assert fitness.calls == 40 + 3  # the budget, then the top 3 re-scored for the pick
    assert len(trace.fitness) == 40 and max(trace.fitness) > start
    assert trace.best_curve()[-1] == max(trace.fitness) and trace.picked is not None


def test_uniform_search_scans_one_shared_weight(pipes):
    base, specialists = pipes
    candidates = PipelineCandidates(base, specialists)
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"))
    key = ("text_encoder", "final_layer_norm.weight")
    both = candidates._delta["lang"][key] + candidates._delta["fast"][key]

    def fitness(pipe) -> float:  # peaks where the shared weight is 1.5 (read off both deltas)
        got = pipe.text_encoder.state_dict()["final_layer_norm.weight"] - candidates._base[key]
        return -abs(float((got * both).sum() / (both * both).sum()) - 1.5)
    trace = uniform_search(candidates, space, fitness, fitness, evaluations=9)
    assert len(trace.genomes) == 9 and all(len(g) == 1 for g in trace.genomes)
    assert trace.genomes[0] == [0.0] and trace.genomes[-1] == [1.0]
    # the shared weight closest to 1.5 wins (weights run over [0, 2] through the cosine map)
    from shoal.flow.genes import to_range
    picked = to_range(trace.picked[0], space.low, space.high)
    assert abs(picked - 1.5) <= min(abs(to_range(g[0], 0, 2) - 1.5) for g in trace.genomes) + 1e-9


def test_budgets_must_be_positive(pipes):
    base, specialists = pipes
    candidates = PipelineCandidates(base, specialists)
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"))
    with pytest.raises(ConfigError, match="evaluations must be at least 1"):
        evolve_blocks(candidates, space, lambda p: 0.0, lambda p: 0.0, evaluations=0)
    with pytest.raises(ConfigError, match="evaluations must be at least 1"):
        uniform_search(candidates, space, lambda p: 0.0, lambda p: 0.0, evaluations=0)


def test_weights_decode_to_a_block_filtered_recipe(pipes):
    base, _ = pipes
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"))
    weights = {(g.model, g.group): 0.25 if g.model == "lang" else 1.75 for g in space.genes}
    recipe = weights_recipe(space, weights, base="B", sources={"lang": "L", "fast": "F"})
    assert recipe["merge_method"] == "task_arithmetic" and recipe["base_model"] == "B"
    lang = next(m for m in recipe["models"] if m["model"] == "L")["parameters"]["weight"]
    filters = [v.get("filter") for v in lang]
    assert "IN00" in filters and "M00" in filters
    assert "text_encoder/encoder.layers.0." in filters  # the names as transformers 5 saves them
    assert all(f is None or f in space.groups or f.startswith("text_encoder/") for f in filters)
    assert lang[-1] == {"value": 0.25} and all(v["value"] == 0.25 for v in lang)


@pytest.mark.parametrize("genes", ["blocks", "parts"])
def test_the_decoded_recipe_merges_to_the_in_memory_candidate(pipes, tmp_path, genes):
    """What the search scored is what ``shoal merge`` builds from the recipe it writes."""
    from safetensors.torch import load_file

    from shoal.merge import merge, parse_recipe

    base, specialists = pipes
    folders = {}
    for name, pipe in {"base": base, **specialists}.items():
        pipe.save_pretrained(str(tmp_path / name), safe_serialization=True)
        folders[name] = str(tmp_path / name)
    candidates = PipelineCandidates(base, specialists)
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"),
                        genes=genes)
    rng = np.random.default_rng(3)
    weights = space.weights(rng.uniform(0, 1, space.size).tolist())
    resident = candidates.apply(weights)
    recipe = weights_recipe(space, weights, base=folders["base"],
                            sources={m: folders[m] for m in specialists})
    merge(parse_recipe(recipe), tmp_path / "merged")
    for component, filename in (("unet", "diffusion_pytorch_model.safetensors"),
                                ("text_encoder", "model.safetensors")):
        written = load_file(str(tmp_path / "merged" / component / filename))
        live = getattr(resident, component).state_dict()
        assert set(written) == set(live)
        for name, tensor in written.items():
            torch.testing.assert_close(tensor, live[name], rtol=1e-5, atol=1e-6, msg=name)


class _Interrupting:
    """A fitness over the resident pipeline that records each call and raises KeyboardInterrupt
    (the process stopped) after ``stop_after`` answers."""

    def __init__(self, candidates, stop_after=None):
        self.key = ("text_encoder", "final_layer_norm.weight")
        self.candidates, self.stop_after, self.seen = candidates, stop_after, []

    def __call__(self, pipe) -> float:
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise KeyboardInterrupt
        got = pipe.text_encoder.state_dict()[self.key[1]] - self.candidates._base[self.key]
        value = -float(got.abs().sum())
        self.seen.append(value)
        return value


def test_a_stopped_per_block_search_resumes_from_its_study(pipes, tmp_path):
    base, specialists = pipes
    candidates = PipelineCandidates(base, specialists)
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"),
                        genes="parts")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = _Interrupting(candidates, stop_after=7)
    with pytest.raises(KeyboardInterrupt):
        evolve_blocks(candidates, space, first, first, evaluations=20, population=6, seed=0,
                      storage=storage)
    again = _Interrupting(candidates)
    trace = evolve_blocks(candidates, space, again, again, evaluations=20, population=6, seed=0,
                          storage=storage)
    assert len(trace.fitness) == 20 and trace.fitness[:7] == first.seen  # the 7 done are kept
    assert len(again.seen) == 13 + 3  # only the rest of the budget, then the top 3 on validation
    import optuna

    study = optuna.load_study(study_name="diffusion-per-block", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 20 and states.count("FAIL") == 1  # the interrupted one
    # a finished study is not searched again, and a smaller budget than it holds is refused
    done = _Interrupting(candidates)
    assert evolve_blocks(candidates, space, done, done, evaluations=20, population=6, seed=0,
                         storage=storage).fitness == trace.fitness
    assert len(done.seen) == 3
    with pytest.raises(ConfigError, match="already holds 20 evaluations"):
        evolve_blocks(candidates, space, done, done, evaluations=10, storage=storage)


def test_a_stopped_uniform_search_scans_each_point_once(pipes, tmp_path):
    base, specialists = pipes
    candidates = PipelineCandidates(base, specialists)
    space = block_space(base.unet.state_dict(), base.text_encoder.state_dict(), ("lang", "fast"))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = _Interrupting(candidates, stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        uniform_search(candidates, space, first, first, evaluations=9, storage=storage)
    again = _Interrupting(candidates)
    trace = uniform_search(candidates, space, again, again, evaluations=9, storage=storage)
    assert [g[0] for g in trace.genomes] == pytest.approx(np.linspace(0, 1, 9).tolist())
    assert len(again.seen) == 5 + 3


def test_part_genes_set_every_block_of_their_part(pipes):
    base, _ = pipes
    unet, text = base.unet.state_dict(), base.text_encoder.state_dict()
    blocks = block_space(unet, text, ("lang", "fast"))
    parts = block_space(unet, text, ("lang", "fast"), genes="parts")
    assert parts.groups == blocks.groups  # the merge is written in the same groups
    assert parts.gene_groups == ("unet_down", "unet_mid", "unet_up", UNET_REST, "text_encoder")
    assert parts.size == 10 and [g.key for g in parts.genes][:2] == ["lang:unet_down", "lang:unet_mid"]
    genome = [i / 10 for i in range(10)]
    weights = parts.weights(genome)
    assert set(weights) == {(m, g) for m in ("lang", "fast") for g in blocks.groups}
    from shoal.flow.genes import to_range
    for (model, group), weight in weights.items():
        index = ("lang", "fast").index(model) * 5
        part = (0 if group.startswith("IN") else 1 if group == "M00" else 2 if group.startswith("OUT")
                else 3 if group == UNET_REST else 4)
        assert weight == pytest.approx(to_range(genome[index + part], 0, 2)), (model, group)
    with pytest.raises(ConfigError, match="unknown gene level 'layers'"):
        block_space(unet, text, ("lang",), genes="layers")
