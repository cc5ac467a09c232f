"""Shared fixtures: tiny Hugging Face checkpoints built locally, never downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                  max_position_embeddings=64, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                  max_position_embeddings=64, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                 bos_token_id=0, eos_token_id=0),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                    max_position_embeddings=64, tie_word_embeddings=False),
}

MakeTinyModel = Callable[..., Path]


def build_tiny_model(out: Path, arch: str = "llama", seed: int = 0, *, base: Path | None = None,
                     noise: float = 0.02, num_layers: int | None = None) -> Path:
    """Save a tiny random ``arch`` model to ``out``.

    With ``base``, the weights are the base model's plus Gaussian noise of std ``noise``
    (a fine-tune of the base, as merging expects).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    if num_layers is not None:
        kwargs["n_layer" if arch == "gpt2" else "num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory fixture: ``tiny_model_dir(name, arch=..., seed=..., base=...)`` -> folder, cached per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple, Path] = {}

    def make(name: str, arch: str = "llama", seed: int = 0, base: Path | None = None,
             noise: float = 0.02, num_layers: int | None = None) -> Path:
        key = (name, arch, seed, base, noise, num_layers)
        if key not in cache:
            cache[key] = build_tiny_model(root / name, arch, seed, base=base, noise=noise,
                                          num_layers=num_layers)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The ``micro`` zoo world, built once per test session in a temporary folder."""
    from shoal.zoo import build_zoo

    return build_zoo("micro", out=tmp_path_factory.mktemp("zoo") / "micro", seed=0)


@pytest.fixture(scope="session")
def tiny_zoo_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Factory fixture: ``tiny_zoo_model(seed)`` -> a tiny random Llama with the zoo tokenizer, cached per session."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from shoal.zoo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tiny_zoo_models")
    cache: dict[int, Path] = {}

    def make(seed: int) -> Path:
        if seed not in cache:
            tokenizer = build_tokenizer()
            config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                          max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            torch.manual_seed(seed)
            out = root / f"seed{seed}"
            AutoModelForCausalLM.from_config(config).save_pretrained(out)
            tokenizer.save_pretrained(out)
            cache[seed] = out
        return cache[seed]

    return make
