"""``shoal extract-lora``: PEFT adapters from fine-tunes, loaded back with ``peft.PeftModel``.

The fine-tunes are built here as the base plus an exact rank-3 update of every linear layer
(and, for Qwen2, bias changes): a rank-3 adapter must reproduce the fine-tune's logits, and a
lower rank must give the best approximation of that rank (checked against torch.linalg.svd
and against the Eckart–Young error).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.cli.main import cli

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 20]])
UPDATE_RANK = 3


def _tiny(arch: str, **extra):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                max_position_embeddings=64, initializer_range=0.2, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Per architecture: a base, a fine-tune by an exact rank-3 update of every linear layer
    (``ft``), one that also changes the embedding by a rank-2 update (``ft_embed``), and a base
    of another hidden size (``other``)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora_models")
    found: dict[str, Path] = {}
    for arch, tied in (("llama", False), ("qwen2", True)):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(_tiny(arch, tie_word_embeddings=tied))
        found[f"{arch}_base"] = root / f"{arch}_base"
        base.save_pretrained(found[f"{arch}_base"])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    rows, cols = module.weight.shape
                    module.weight += (0.3 * torch.randn(rows, UPDATE_RANK, generator=generator)
                                      @ torch.randn(UPDATE_RANK, cols, generator=generator))
                    if module.bias is not None:
                        module.bias += 0.1 * torch.randn(rows, generator=generator)
        found[f"{arch}_ft"] = root / f"{arch}_ft"
        base.save_pretrained(found[f"{arch}_ft"])
        with torch.no_grad():
            embed = base.get_input_embeddings().weight
            embed += 0.3 * torch.randn(embed.shape[0], 2, generator=generator) @ torch.randn(2, 32, generator=generator)
        found[f"{arch}_ft_embed"] = root / f"{arch}_ft_embed"
        base.save_pretrained(found[f"{arch}_ft_embed"])
    torch.manual_seed(0)
    other = _tiny("llama", tie_word_embeddings=False)
    other.hidden_size = 48
    AutoModelForCausalLM.from_config(other).save_pretrained(root / "other")
    found["other"] = root / "other"
    return found


@torch.no_grad()
def _logits(folder: Path, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()(IDS).logits


def _extract(models: dict[str, Path], out: Path, arch: str, rank: int, *extra: str, model: str = "ft"):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["extract-lora", "--model", str(models[f"{arch}_{model}"]),
                                    "--base", str(models[f"{arch}_base"]), "--rank", str(rank), str(out), "-q",
                                    *extra])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_updates_rank_reproduces_the_fine_tune(models, tmp_path, arch):
    out = tmp_path / "adapter"
    result = _extract(models, out, arch, UPDATE_RANK)
    assert result.exit_code == 0, result.output
    assert f"rank-{UPDATE_RANK} LoRA adapter (14 modules" in result.stdout
    tuned = _logits(models[f"{arch}_ft"])
    assert (tuned - _logits(models[f"{arch}_base"])).abs().max() > 0.1  # the fine-tune is far from the base
    torch.testing.assert_close(_logits(models[f"{arch}_base"], out), tuned, atol=2e-5, rtol=1e-4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["peft_type"], config["r"], config["lora_alpha"]) == (
        "CAUSAL_LM", "LORA", UPDATE_RANK, UPDATE_RANK)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert {"embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    assert config["lora_bias"] is (arch == "qwen2")  # Qwen2's q/k/v biases changed
    weights = load_file(out / "adapter_model.safetensors")
    a = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (UPDATE_RANK, 32) and b.shape == (32, UPDATE_RANK)
    assert "base_model.model.model.embed_tokens.weight" in weights and (out / "README.md").is_file()


def test_a_lower_rank_gives_the_best_approximation(models, tmp_path):
    out = tmp_path / "adapter"
    assert _extract(models, out, "llama", 2).exit_code == 0
    weights = load_file(out / "adapter_model.safetensors")
    tuned, base = load_file(models["llama_ft"] / "model.safetensors"), load_file(models["llama_base"] / "model.safetensors")
    names = [n for n in tuned if n.endswith("_proj.weight")]
    assert len(names) == 14
    for name in names:
        delta = tuned[name] - base[name]
        module = name.removesuffix(".weight")
        product = (weights[f"base_model.model.{module}.lora_B.weight"]
                   @ weights[f"base_model.model.{module}.lora_A.weight"])
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(product.double(), best, atol=1e-4, rtol=1e-4)
        error = torch.linalg.matrix_norm(delta.double() - product.double())
        assert abs(float(error) - float(s[2:].square().sum().sqrt())) < 1e-4 * float(s[0])
    # the adapter loads, and rank 2 of a rank-3 update does not give the fine-tune
    assert (_logits(models["llama_base"], out) - _logits(models["llama_ft"])).abs().max() > 1e-3


def test_a_rank_above_a_matrix_size_takes_its_full_rank(models, tmp_path):
    out = tmp_path / "adapter"
    assert _extract(models, out, "llama", 40, "--no-distribute-scale").exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 32  # the largest rank a 32-wide matrix has
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 16  # k_proj is 16 x 32
    assert config["rank_pattern"] == config["alpha_pattern"] and len(config["rank_pattern"]) == 4
    torch.testing.assert_close(_logits(models["llama_base"], out), _logits(models["llama_ft"]), atol=2e-5, rtol=1e-4)
    weights = load_file(out / "adapter_model.safetensors")
    b = weights["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]  # orthonormal without the scale
    torch.testing.assert_close(b.T @ b, torch.eye(32), atol=1e-4, rtol=0)


def test_embed_lora_puts_the_embedding_change_in_lora_embedding_factors(models, tmp_path):
    out = tmp_path / "adapter"
    result = _extract(models, out, "llama", UPDATE_RANK, "--embed-lora", model="ft_embed")
    assert result.exit_code == 0, result.output
    weights = load_file(out / "adapter_model.safetensors")
    assert weights["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (UPDATE_RANK, 96)
    assert weights["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, UPDATE_RANK)
    assert "base_model.model.model.embed_tokens.weight" not in weights
    config = json.loads((out / "adapter_config.json").read_text())
    assert "embed_tokens" in config["target_modules"] and "lm_head" in config["target_modules"]
    torch.testing.assert_close(_logits(models["llama_base"], out), _logits(models["llama_ft_embed"]),
                               atol=2e-5, rtol=1e-4)


def test_exclude_and_skip_undecomposable(models, tmp_path):
    out = tmp_path / "adapter"
    result = _extract(models, out, "llama", UPDATE_RANK, "-e", r"layers\.0\.mlp", "--skip-undecomposable",
                      "--save-module", "lm_head")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.up_proj" not in config["target_modules"]
    assert "model.layers.1.mlp.up_proj" in config["target_modules"]  # full names: short ones would reach layer 0
    assert config["modules_to_save"] == ["lm_head", "embed_tokens"]
    weights = load_file(out / "adapter_model.safetensors")
    assert not any("layers.0.mlp" in n or "norm" in n for n in weights)


@pytest.mark.parametrize("overrides, extra, message", [
    ({"--model": "MISSING"}, [], "no such file or folder"),
    ({"--base": "OTHER"}, [], "shape [32, 32] in the fine-tune, [32, 48] in the base model"),
    ({}, ["-i", "(unclosed"], "is not a regular expression"),
    ({}, ["-i", "nothing-matches", "--skip-undecomposable", "--embed-lora"], "no module to extract"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(models, tmp_path, overrides, extra, message):
    values = {"MISSING": str(tmp_path / "missing"), "OTHER": str(models["other"])}
    command = {"--model": str(models["llama_ft"]), "--base": str(models["llama_base"]), "--rank": "2"}
    command.update({flag: values[value] for flag, value in overrides.items()})
    out = tmp_path / "out"
    flat = [item for pair in command.items() for item in pair]
    result = CliRunner().invoke(cli, ["extract-lora", *flat, *extra, str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))
