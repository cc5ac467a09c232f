"""Fixtures for checkpoint tests: hand-made safetensors bytes and a tiny vision-language model."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch


def encode_safetensors(header: dict, data: bytes) -> bytes:
    """The safetensors byte layout written out by hand: u64 header length, JSON header, data."""
    header_bytes = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


@pytest.fixture
def raw_safetensors(tmp_path: Path) -> Callable[..., Path]:
    """``raw_safetensors(name, header, data)`` writes exactly those bytes (lies included) to a file."""

    def write(name: str, header: dict, data: bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_safetensors(header, data))
        return path

    return write


@pytest.fixture
def two_tensor_file(raw_safetensors) -> Callable[..., Path]:
    """A valid file with float32 ``a`` (2x3) and ``b`` (4,), optionally with header fields overridden."""

    def make(name: str = "model.safetensors", **overrides: dict) -> Path:
        a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        b = torch.tensor([1.0, -2.0, 3.5, 4.0])
        header = {
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
        }
        for key, fields in overrides.items():
            header[key] = {**header[key], **fields}
        return raw_safetensors(name, header, a.numpy().tobytes() + b.numpy().tobytes())

    return make


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA checkpoint (CLIP vision tower + Llama language model shaped like the tiny llama)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=8, patch_size=4)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=95))
    out = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(out)
    return out
