"""``shoal merge`` end to end: recipe -> merged folder -> transformers loads it.

Expected tensors are computed here from the source files with plain formulas (or by calling
the method function directly on tensors read with ``safetensors``), independently of the
planner and the streaming executor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from shoal.cli.main import cli
from shoal.merge.registry import get_method


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder (single file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def load_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 2]])).logits


@pytest.fixture(scope="module")
def llama_trio(tiny_model_dir):  # type: ignore[no-untyped-def]
    base = tiny_model_dir("llama_base", "llama", seed=1)
    a = tiny_model_dir("llama_a", "llama", seed=2, base=base)
    b = tiny_model_dir("llama_b", "llama", seed=3, base=base)
    return base, a, b


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_linear_merge_loads_in_transformers(tmp_path: Path, tiny_model_dir, arch: str) -> None:  # type: ignore[no-untyped-def]
    a = tiny_model_dir(f"{arch}_x", arch, seed=10)
    b = tiny_model_dir(f"{arch}_y", arch, seed=11)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.25}},
                   {"model": str(b), "parameters": {"weight": 0.75}}],
    })
    out = tmp_path / "merged"
    result = run(["merge", recipe, out, "--quiet"])
    assert result.exit_code == 0, result.output
    got, wa, wb = weights(out), weights(a), weights(b)
    assert set(got) == set(wa)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, 0.25 * wa[name] + 0.75 * wb[name], rtol=1e-6, atol=1e-6)
    logits = load_logits(out)
    assert torch.isfinite(logits).all()
    assert (out / "config.json").exists() and (out / "shoal_recipe.yaml").exists()
    card = (out / "README.md").read_text()
    assert "linear" in card and str(a) in card


def test_ties_matches_the_method_applied_to_raw_tensors(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = llama_trio
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(base)},
                   {"model": str(a), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.4, "density": 0.3}}],
        "parameters": {"lambda": 1.2},
    })
    out = tmp_path / "ties"
    assert run(["merge", recipe, out, "-q"]).exit_code == 0
    got, wbase, wa, wb = weights(out), weights(base), weights(a), weights(b)
    ties = get_method("ties")
    for name in wbase:
        expected = ties.fn(wbase[name], [wa[name], wb[name]], weight=[0.6, 0.4], density=[0.5, 0.3],
                           lambda_=1.2, normalize=True)
        torch.testing.assert_close(got[name], expected)
    assert torch.isfinite(load_logits(out)).all()


def test_dare_is_seeded_and_recipe_records_the_seed(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = llama_trio
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "dare_ties", "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}}],
    })
    outs = []
    for i, seed in enumerate([7, 7, 8]):
        out = tmp_path / f"dare{i}"
        assert run(["merge", recipe, out, "-q", "--seed", seed]).exit_code == 0
        outs.append(weights(out))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs[0][name], outs[1][name])
    assert not torch.equal(outs[0][name], outs[2][name])
    saved = yaml.safe_load((tmp_path / "dare0" / "shoal_recipe.yaml").read_text())
    assert saved["seed"] == 7
    # merging the saved recipe again reproduces the model bitwise
    assert run(["merge", tmp_path / "dare0" / "shoal_recipe.yaml", tmp_path / "again", "-q"]).exit_code == 0
    assert torch.equal(weights(tmp_path / "again")[name], outs[0][name])


def test_gradient_and_filter_parameters(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    _, a, b = llama_trio
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "slerp", "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]},
                             {"filter": "mlp", "value": 0.25}, {"value": 0.0}]},
    })
    out = tmp_path / "slerp"
    assert run(["merge", recipe, out, "-q"]).exit_code == 0
    got, wa, wb = weights(out), weights(a), weights(b)
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"], wa["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(got["model.layers.1.self_attn.q_proj.weight"], wb["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    # mlp at t = 0.25: spherical interpolation written out here
    name = "model.layers.1.mlp.down_proj.weight"
    v0, v1 = wa[name].flatten().double(), wb[name].flatten().double()
    omega = math.acos(float((v0 / v0.norm()) @ (v1 / v1.norm())))
    expected = (math.sin(0.75 * omega) * v0 + math.sin(0.25 * omega) * v1) / math.sin(omega)
    torch.testing.assert_close(got[name].flatten().double(), expected, rtol=1e-4, atol=1e-5)


def test_passthrough_slices_stack_layers(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    _, a, b = llama_trio
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(b), "layer_range": [1, 2]}]}],
    })
    out = tmp_path / "stack"
    result = run(["merge", recipe, out, "-q"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    got, wa, wb = weights(out), weights(a), weights(b)
    torch.testing.assert_close(got["model.layers.2.mlp.up_proj.weight"], wb["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"], wa["model.layers.1.mlp.up_proj.weight"])
    # as mergekit: what comes before the layers from the first slice's model, what comes after from the last's
    torch.testing.assert_close(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(got["lm_head.weight"], wb["lm_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(got["model.norm.weight"], wb["model.norm.weight"], rtol=0, atol=0)
    assert load_logits(out).shape[-1] == 96


def test_sharding_and_dry_run(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    base, a, _ = llama_trio
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}],
    })
    dry = run(["merge", recipe, tmp_path / "never", "--dry-run"])
    assert dry.exit_code == 0
    assert "model.layers.1.mlp.up_proj.weight" in dry.output and "task_arithmetic" in dry.output
    assert not (tmp_path / "never").exists()
    out = tmp_path / "sharded"
    assert run(["merge", recipe, out, "-q", "--shard-size", "20KB"]).exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    wb, wa = weights(base), weights(a)
    got = weights(out)
    for name in wb:
        torch.testing.assert_close(got[name], wb[name] + 0.5 * (wa[name] - wb[name]))
    assert torch.isfinite(load_logits(out)).all()


def test_prefix_map_merges_the_language_model_of_a_vlm(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    """EvoVLM-JP: the LLM inside a vision-language checkpoint merges with a plain LLM; the
    vision tower is copied unchanged."""
    _, a, b = llama_trio
    llm = weights(b)
    vlm_dir = tmp_path / "tiny_vlm"
    vlm_dir.mkdir()
    vlm = {f"language_model.{k}": v.clone() + 0.01 for k, v in weights(a).items()}
    vlm["vision_tower.patch_embed.weight"] = torch.randn(8, 3)
    vlm["multi_modal_projector.linear.weight"] = torch.randn(32, 8)
    save_file(vlm, str(vlm_dir / "model.safetensors"), metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(vlm_dir / "model.safetensors"), "parameters": {"weight": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.5},
                    "prefix_map": {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}}],
    })
    out = tmp_path / "vlm_merged"
    result = run(["merge", recipe, out, "-q"])
    assert result.exit_code == 0, result.output
    got = weights(out)
    assert set(got) == set(vlm)
    torch.testing.assert_close(got["vision_tower.patch_embed.weight"], vlm["vision_tower.patch_embed.weight"])
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(got[f"language_model.{name}"], 0.5 * vlm[f"language_model.{name}"] + 0.5 * llm[name])


def test_tokenizer_source_gives_its_tokenizer_and_vocabulary(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, a, b = llama_trio
    words = ["<pad>", "<eos>", "hello", "world", "<unk>"]
    folders = {}
    for name, src, order in (("a_tok", a, words), ("b_tok", b, [words[0], words[1], words[3], words[2], words[4]])):
        folders[name] = tmp_path / name
        shutil.copytree(src, folders[name])
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(order)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                unk_token="<unk>").save_pretrained(folders[name])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear", "tokenizer_source": str(folders["b_tok"]), "dtype": "float32",
        "models": [{"model": str(folders["a_tok"])}, {"model": str(folders["b_tok"])}],
    })
    out = tmp_path / "tok"
    assert run(["merge", recipe, out, "-q"]).exit_code == 0
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded("hello world")["input_ids"] == [3, 2]  # b's ids
    # mergekit's rule: the output has the source tokenizer's rows, each merged by token
    embed = weights(out)["model.embed_tokens.weight"]
    ea, eb = weights(a)["model.embed_tokens.weight"].float(), weights(b)["model.embed_tokens.weight"].float()
    assert embed.shape[0] == 5 == json.loads((out / "config.json").read_text())["vocab_size"]
    torch.testing.assert_close(embed[3], (ea[2] + eb[3]) / 2)  # "hello": a's row 2, b's row 3
    missing = write_recipe(tmp_path / "m.yaml", {
        "merge_method": "linear", "tokenizer_source": str(folders["b_tok"]),
        "models": [{"model": str(a)}, {"model": str(folders["b_tok"])}]})
    refused = run(["merge", missing, tmp_path / "m", "-q"])
    assert refused.exit_code == 2 and not (tmp_path / "m").exists()
    assert len(refused.stderr.strip().splitlines()) == 1 and "tokenizer" in refused.stderr


def test_methods_command_lists_every_method() -> None:
    result = run(["methods"])
    assert result.exit_code == 0
    for name in ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                 "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough"]:
        assert name in result.output


def test_gradients_run_from_embeddings_to_the_head(tmp_path: Path, llama_trio) -> None:  # type: ignore[no-untyped-def]
    """A gradient's first anchor applies to layer 0 and, as in mergekit, to every tensor outside the
    layers (embeddings, final norm, lm_head); its last to the last layer (whatever order the file lists
    tensors in)."""
    _, a, b = llama_trio
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                   {"model": str(b), "parameters": {"weight": [0.0, 1.0]}}],
        "parameters": {"normalize": True},
    })
    out = tmp_path / "grad"
    assert run(["merge", recipe, out, "-q"]).exit_code == 0
    got, wa, wb = weights(out), weights(a), weights(b)
    for name in ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                 "lm_head.weight"]:
        torch.testing.assert_close(got[name], wa[name])
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"],
                               0.5 * wa["model.layers.1.mlp.up_proj.weight"] + 0.5 * wb["model.layers.1.mlp.up_proj.weight"])
