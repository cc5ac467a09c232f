"""``shoal moe``: Mixtral and Qwen2-MoE models from dense experts, loaded back with transformers.

The parity tests build a MoE whose single expert is the base model's MLP with top-1 routing
(for Qwen2-MoE, plus a shared expert whose down projection is zero): its logits must be the
dense model's, and every weight must be loaded (no missing or unexpected keys). Gate rows are
checked against references computed independently here (forward pre-hooks on the decoder
layers, embedding lookups).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.cli.main import cli
from shoal.merge.moe import build_moe
from shoal.merge.moe_config import parse_moe_config

IDS = torch.tensor([[1, 7, 9, 12, 15, 20, 4]])


@pytest.fixture(scope="module")
def tokenizer():
    from shoal.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny Llama and Qwen2 models with the zoo tokenizer: a base, an expert, a zero-MLP-output model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe_models")
    found: dict[str, Path] = {}
    for arch in ("llama", "qwen2"):
        for name, seed, intermediate in (("base", 0, 64), ("expert", 1, 64), ("wide", 2, 96)):
            config = AutoConfig.for_model(arch, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                          max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                          initializer_range=0.2)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
            found[f"{arch}_{name}"] = root / f"{arch}_{name}"
            model.save_pretrained(found[f"{arch}_{name}"])
            tokenizer.save_pretrained(found[f"{arch}_{name}"])
            if name == "base":
                with torch.no_grad():
                    for layer in model.model.layers:
                        layer.mlp.down_proj.weight.zero_()
                found[f"{arch}_zero"] = root / f"{arch}_zero"
                model.save_pretrained(found[f"{arch}_zero"])
    return found


def _load(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@torch.no_grad()
def _logits(folder: Path) -> torch.Tensor:
    return _load(folder)(IDS).logits


def _run(tmp_path: Path, config: dict, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(cli, ["moe", str(path), str(out), "-q", *extra])


def test_mixtral_with_the_base_as_its_one_expert_is_the_dense_model(models, tmp_path):
    config = {"base_model": str(models["llama_base"]), "gate_mode": "random", "experts_per_token": 1,
              "experts": [{"source_model": str(models["llama_base"])}]}
    out = tmp_path / "moe"
    refused = _run(tmp_path, config, out)
    assert refused.exit_code == 2 and "every expert is" in refused.stderr and not out.exists()
    result = _run(tmp_path, config, out, "--i-understand-this-is-not-useful-without-training")
    assert result.exit_code == 0, result.output
    assert "MixtralForCausalLM with 1 experts" in result.stdout
    model = _load(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(_logits(out), _logits(models["llama_base"]), atol=1e-5, rtol=1e-5)
    assert (out / "shoal_moe.yaml").is_file() and (out / "README.md").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_qwen2_moe_with_a_shared_expert(models, tmp_path, arch):
    """Routed expert = the base's MLP, shared expert outputs zero: the dense model again (from a
    Llama too, whose attention gets zero biases)."""
    config = {"base_model": str(models[f"{arch}_base"]), "gate_mode": "random", "experts_per_token": 1,
              "experts": [{"source_model": str(models[f"{arch}_base"])}],
              "shared_experts": [{"source_model": str(models[f"{arch}_zero"])}]}
    out = tmp_path / "qmoe"
    result = _run(tmp_path, config, out, "--i-understand-this-is-not-useful-without-training")
    assert result.exit_code == 0, result.output
    model = _load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config.norm_topk_prob and model.config.shared_expert_intermediate_size == 64
    torch.testing.assert_close(_logits(out), _logits(models[f"{arch}_base"]), atol=1e-5, rtol=1e-5)
    # with the expert's own shared MLP the output differs: the shared expert is really used
    config["shared_experts"] = [{"source_model": str(models[f"{arch}_expert"])}]
    other = tmp_path / "qmoe2"
    assert _run(tmp_path, config, other, "--i-understand-this-is-not-useful-without-training").exit_code == 0
    assert (_logits(other) - _logits(models[f"{arch}_base"])).abs().max() > 1e-3


def _prompt_ids(tokenizer, prompt: str) -> list[int]:  # type: ignore[no-untyped-def]
    return [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def _reference_hidden_rows(folder: Path, tokenizer, prompts: list[str], average: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(L, H): mean over prompts of what each decoder layer receives, caught with forward pre-hooks."""
    model = _load(folder)
    rows = []
    for prompt in prompts:
        seen: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            (kwargs.get("hidden_states") if kwargs.get("hidden_states") is not None else args[0])[0]),
            with_kwargs=True) for layer in model.model.layers]
        model(torch.tensor([_prompt_ids(tokenizer, prompt)]))
        for hook in hooks:
            hook.remove()
        rows.append(torch.stack([s.mean(0) if average else s[-1] for s in seen]))
    return torch.stack(rows).mean(0)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates_are_the_base_models_layer_inputs(models, tokenizer, tmp_path, mode):
    positive = [["tom eats apples", "ann sees the river"], ["how many coins does bob have", "kim counts cards"]]
    negative = [None, ["tom eats apples"]]
    config = {"base_model": str(models["llama_base"]), "gate_mode": mode, "experts_per_token": 2,
              "experts": [{"source_model": str(models["llama_base"]), "positive_prompts": positive[0]},
                          {"source_model": str(models["llama_expert"]), "positive_prompts": positive[1],
                           "negative_prompts": negative[1]}]}
    out = tmp_path / "moe"
    result = _run(tmp_path, config, out)
    assert result.exit_code == 0, result.output
    weights = load_file(out / "model.safetensors")
    for index in range(2):
        rows = _reference_hidden_rows(models["llama_base"], tokenizer, positive[index], mode == "hidden_avg")
        if negative[index]:
            rows = rows - _reference_hidden_rows(models["llama_base"], tokenizer, negative[index],
                                                 mode == "hidden_avg")
        for layer in range(2):
            gate = weights[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
            assert gate.shape == (2, 32)
            torch.testing.assert_close(gate[index], _unit(rows[layer]), atol=1e-5, rtol=1e-4)
    assert torch.isfinite(_logits(out)).all()


def test_cheap_embed_gates_and_the_expert_weights(models, tokenizer, tmp_path):
    config = {"base_model": str(models["llama_base"]), "gate_mode": "cheap_embed", "dtype": "bfloat16",
              "experts": [{"source_model": str(models["llama_base"]), "positive_prompts": ["tom eats"]},
                          {"source_model": str(models["llama_expert"]), "positive_prompts": ["how many coins"],
                           "negative_prompts": ["red"], "residual_scale": 0.5}]}
    out = tmp_path / "moe"
    assert _run(tmp_path, config, out).exit_code == 0
    weights = load_file(out / "model.safetensors")
    base, expert = load_file(models["llama_base"] / "model.safetensors"), load_file(
        models["llama_expert"] / "model.safetensors")
    embed = base["model.embed_tokens.weight"]

    def summed(prompts: list[str]) -> torch.Tensor:
        return _unit(sum(embed[torch.tensor(_prompt_ids(tokenizer, p))].sum(0) for p in prompts))

    expected = torch.stack([summed(["tom eats"]), _unit(summed(["how many coins"]) - summed(["red"]))])
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        assert weights[f"{prefix}.gate.weight"].dtype == torch.bfloat16
        torch.testing.assert_close(weights[f"{prefix}.gate.weight"].float(), expected, atol=1e-2, rtol=1e-2)
        mlp = f"model.layers.{layer}.mlp"
        assert torch.equal(weights[f"{prefix}.experts.0.w1.weight"], base[f"{mlp}.gate_proj.weight"].bfloat16())
        assert torch.equal(weights[f"{prefix}.experts.1.w3.weight"], expert[f"{mlp}.up_proj.weight"].bfloat16())
        assert torch.equal(weights[f"{prefix}.experts.1.w2.weight"],
                           (expert[f"{mlp}.down_proj.weight"] * 0.5).bfloat16())
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                       base["model.layers.0.self_attn.q_proj.weight"].bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_random_gates_follow_the_seed(models, tmp_path):
    def config(mode: str, seed: int):  # type: ignore[no-untyped-def]
        return parse_moe_config({"base_model": str(models["llama_base"]), "gate_mode": mode, "seed": seed,
                                 "experts": [{"source_model": str(models["llama_base"])},
                                             {"source_model": str(models["llama_expert"])}]})

    first = build_moe(config("random", 3), tmp_path / "a").gates
    again = build_moe(config("random", 3), tmp_path / "b").gates
    other = build_moe(config("random", 4), tmp_path / "c").gates
    uniform = build_moe(config("uniform_random", 3), tmp_path / "d").gates
    assert first.shape == (2, 2, 32) and torch.equal(first, again) and not torch.equal(first, other)
    assert uniform.abs().max() <= 32 ** -0.5 and uniform.std() < first.std()


@pytest.mark.parametrize("change, message", [
    ({"experts_per_token": 3}, "experts_per_token is 3 but there are only 2 experts"),
    ({"gate_mod": "random"}, "unknown key 'gate_mod'"),
    ({"gate_mode": "hidden"}, "experts.0.positive_prompts: gate_mode hidden needs prompts"),
    ({"shared_experts": [{"source_model": "EXPERT"}], "architecture": "mixtral"},
     "MixtralForCausalLM has no shared experts"),
    ({"architecture": "deepseek"}, "shoal builds mixtral or qwen"),
    ({"experts": [{"source_model": "WIDE"}, {"source_model": "EXPERT"}]}, "has shape [32, 96], the base model's is [32, 64]"),
    ({"experts": [{"source_model": "MISSING"}, {"source_model": "EXPERT"}]}, "no such file or folder"),
    ({"base_model": "QWEN"}, "needs models of one architecture"),
])
def test_bad_configs_exit_2_with_one_line_and_write_nothing(models, tmp_path, change, message):
    names = {"EXPERT": str(models["llama_expert"]), "WIDE": str(models["llama_wide"]),
             "MISSING": str(tmp_path / "missing"), "QWEN": str(models["qwen2_base"])}
    config = {"base_model": str(models["llama_base"]), "gate_mode": "random",
              "experts": [{"source_model": str(models["llama_base"])}, {"source_model": names["EXPERT"]}], **change}
    text = yaml.safe_dump(config)
    for placeholder, path in names.items():
        text = text.replace(f" {placeholder}\n", f" {path}\n")
    (tmp_path / "moe.yaml").write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["moe", str(tmp_path / "moe.yaml"), str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_identical_prompts_are_refused(models, tmp_path):
    config = {"base_model": str(models["llama_base"]), "gate_mode": "cheap_embed",
              "experts": [{"source_model": str(models["llama_base"]), "positive_prompts": ["a"]},
                          {"source_model": str(models["llama_expert"]), "positive_prompts": ["a"]}]}
    result = _run(tmp_path, config, tmp_path / "out")
    assert result.exit_code == 2 and "every expert has the same prompts" in result.stderr
