"""All-ones paths exported to the source architecture, and passthrough slices as paths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from shoal.errors import MergeError, RecipeError
from shoal.flow.build import build_path_model, save_path_model
from shoal.flow.export import export_path, export_path_model
from shoal.flow.path import make_path
from shoal.flow.slices import path_from_slices, slices_from_path
from shoal.merge.recipe import load_recipe, parse_recipe

PATH = [(0, 0), (0, 1), (1, 1), (1, 2), (0, 1), (1, 0), (0, 2)]


def tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def load_plain(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_all_ones_export_equals_the_runtime(word_sources, word_tokenizer, tmp_path):
    a, b = word_sources
    path = make_path(PATH)
    runtime = build_path_model([a, b], path)
    out = export_path([a, b], path, tmp_path / "stacked")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == len(PATH)
    plain = load_plain(out)
    enc = word_tokenizer(["what is two plus two ?", "red cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(plain(**enc).logits, runtime(**enc).logits)
    # layer i of the export is the hop's source layer, bit for bit
    source_b = tensors(b)
    stacked = tensors(out)
    assert torch.equal(stacked["model.layers.3.mlp.down_proj.weight"], source_b["model.layers.2.mlp.down_proj.weight"])
    # the saved layer-path folder exports to the same checkpoint
    again = export_path_model(save_path_model(runtime, tmp_path / "saved"), tmp_path / "stacked_again")
    assert set(tensors(again)) == set(stacked)
    assert all(torch.equal(tensors(again)[k], stacked[k]) for k in stacked)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(again)("cat")["input_ids"] == word_tokenizer("cat")["input_ids"]
    # the folder carries the equivalent passthrough recipe, which describes the same path
    recipe = load_recipe(out / "shoal_recipe.yaml")
    assert path_from_slices(recipe) == ([str(a), str(b)], path)


def stacked_by_hand(sources, hops):
    """What an export holds: the first source's tensors outside the layers, and as layer i the
    tensors of hop i's source layer."""
    source = [tensors(s) for s in sources]
    out = {n: t for n, t in source[0].items() if ".layers." not in n}
    for i, (m, layer) in enumerate(hops):
        prefix = f"model.layers.{layer}."
        out.update({f"model.layers.{i}." + n[len(prefix):]: t for n, t in source[m].items() if n.startswith(prefix)})
    return out


@pytest.mark.parametrize("hops", [PATH, [(1, 0), (1, 1), (0, 2), (0, 0), (0, 1)], [(0, 0), (0, 2)]])
def test_both_exports_hold_the_stacked_tensors_and_the_first_config(word_sources, tmp_path, hops):
    """From the sources and from a saved folder (pruned, or holding every layer): the tensors
    are the hops' source layers bit for bit, the config the first source's with the hop count."""
    from shoal.flow.configuration_layer_path import MODEL_TYPE

    a, b = word_sources
    path = make_path(hops)
    want = stacked_by_hand([a, b], hops)
    config = json.loads((a / "config.json").read_text()) | {"num_hidden_layers": len(hops)}
    resident = build_path_model([a, b], path, keep="all")
    unpruned = tmp_path / "unpruned"
    resident.save_pretrained(unpruned)  # every stored layer, not only those the path runs
    assert json.loads((unpruned / "config.json").read_text())["model_type"] == MODEL_TYPE
    outs = [export_path([a, b], path, tmp_path / "from_sources"),
            export_path_model(save_path_model(resident, tmp_path / "saved"), tmp_path / "from_saved"),
            export_path_model(unpruned, tmp_path / "from_unpruned")]
    for out in outs:
        have = tensors(out)
        assert set(have) == set(want), out.name
        assert all(torch.equal(have[k], want[k]) and have[k].dtype == want[k].dtype for k in want), out.name
        got = json.loads((out / "config.json").read_text())
        skip = ("transformers_version", "torch_dtype")  # a saved folder's dtype is written both ways
        assert {k: v for k, v in got.items() if k not in skip} == \
            {k: v for k, v in config.items() if k not in skip}, out.name
        assert not list(out.glob("*.py")) and path_from_slices(load_recipe(out / "shoal_recipe.yaml"))[1] == path


def test_export_refuses_scaled_paths(word_sources, tmp_path):
    a, b = word_sources
    with pytest.raises(MergeError, match=r"path\[1\] has scale 0.5"):
        export_path([a, b], make_path([(0, 0), (1, 1, 0.5), (0, 2)]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_passthrough_slices_build_the_same_model_as_the_path(word_sources, word_tokenizer, tmp_path):
    from shoal.merge.execute import merge

    a, b = word_sources
    recipe = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(a), "layer_range": [1, 3]}]},
    ]})
    sources, path = path_from_slices(recipe)
    assert sources == [str(a), str(b)]
    assert path == make_path([(0, 0), (0, 1), (1, 1), (1, 2), (0, 1), (0, 2)])
    merged = merge(recipe, tmp_path / "merged").out
    exported = export_path(sources, path, tmp_path / "exported")
    want, have = tensors(merged), tensors(exported)
    assert set(want) == set(have) and all(torch.equal(want[k], have[k]) for k in want)
    enc = word_tokenizer(["what is two plus two ?", "red cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(build_path_model(sources, path)(**enc).logits, load_plain(merged)(**enc).logits)


def test_slices_that_are_not_a_path(word_sources):
    a, b = word_sources
    scaled = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2], "parameters": {"scale": 0.5}}]}]})
    with pytest.raises(RecipeError, match=r"slices\[0\].sources\[0\].parameters"):
        path_from_slices(scaled)
    merged = parse_recipe({"merge_method": "linear", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]}]})
    with pytest.raises(RecipeError, match="passthrough"):
        path_from_slices(merged)


def test_slices_from_a_path_that_starts_in_another_model(word_sources, tmp_path):
    from shoal.merge.execute import merge

    a, b = word_sources
    path = make_path([(1, 0), (1, 1), (0, 2), (0, 0), (0, 1)])
    recipe = slices_from_path([str(a), str(b)], path)
    assert recipe.base_model == str(a)  # embeddings and head stay the first model's
    assert [s.sources[0].layer_range for s in recipe.slices] == [(0, 2), (2, 3), (0, 2)]
    assert path_from_slices(recipe) == ([str(a), str(b)], path)
    want = tensors(merge(recipe, tmp_path / "merged").out)
    have = tensors(export_path([a, b], path, tmp_path / "exported"))
    assert set(want) == set(have) and all(torch.equal(want[k], have[k]) for k in want)
