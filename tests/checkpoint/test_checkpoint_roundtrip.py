"""Read a tiny model, write it back in small shards, and check transformers sees the same model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shoal.checkpoint import (
    ShardedWriter,
    copy_support_files,
    is_tied,
    open_checkpoint,
    staged_output,
)

SHARD_BYTES = 16 * 1024


def rewrite(source: Path, destination: Path, *, shard_bytes: int, dtype: torch.dtype | None = None) -> dict:
    reader = open_checkpoint(source)
    with staged_output(destination) as stage:
        writer = ShardedWriter(stage, max_shard_bytes=shard_bytes)
        for name in reader.tensor_names():
            writer.add(name, reader.get(name, dtype=dtype))
        weight_map = writer.close()
        updates = {"dtype": str(dtype).removeprefix("torch.")} if dtype else None
        copy_support_files(reader, stage, config_updates=updates)
    reader.close()
    return weight_map


def expected_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Greedy packing in order: a shard closes when the next tensor would overflow it."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if current and used + size > limit:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def logits(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 4, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sharded_round_trip_loads_in_transformers(arch, tiny_model_dir, tmp_path):
    source = tiny_model_dir(f"rt-{arch}", arch=arch)
    reader = open_checkpoint(source)
    names = reader.tensor_names()
    sizes = [(n, reader.nbytes(n)) for n in names]

    out = tmp_path / "out"
    weight_map = rewrite(source, out, shard_bytes=SHARD_BYTES)

    groups = expected_shards(sizes, SHARD_BYTES)
    assert len(groups) >= 3
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    assert set(weight_map) == set(names)
    assert index["metadata"]["total_size"] == sum(size for _, size in sizes)
    for number, group in enumerate(groups, start=1):
        shard = out / files[number - 1]
        with safe_open(str(shard), framework="pt") as handle:
            assert sorted(handle.keys()) == sorted(group)
            assert handle.metadata() == {"format": "pt"}
            for name in group:
                assert torch.equal(handle.get_tensor(name), reader.get(name))
        stored = sum(dict(sizes)[n] for n in group)
        assert stored <= SHARD_BYTES or len(group) == 1

    # Tied checkpoints stay tied: the writer only wrote what the source has.
    assert ("lm_head.weight" in weight_map) == (not is_tied(reader.config, names))
    assert torch.equal(logits(out), logits(source))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_round_trip_in_bfloat16_updates_config(tiny_model_dir, tmp_path):
    source = tiny_model_dir("rt-llama", arch="llama")
    out = tmp_path / "bf16"
    rewrite(source, out, shard_bytes=SHARD_BYTES, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    with open_checkpoint(out) as reader:
        assert {reader.dtype(n) for n in reader.tensor_names()} == {torch.bfloat16}

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    # bf16 weights loaded as bf16 give the same logits as the fp32 source rounded to bf16.
    assert torch.equal(logits(out, torch.bfloat16), logits(source, torch.bfloat16))


def test_one_shard_is_a_single_model_safetensors(tiny_model_dir, tmp_path):
    source = tiny_model_dir("rt-llama", arch="llama")
    out = tmp_path / "single"
    weight_map = rewrite(source, out, shard_bytes=2**30)
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert set(weight_map.values()) == {"model.safetensors"}
    assert torch.equal(logits(out), logits(source))


def test_single_safetensors_file_and_index_file_as_input(tiny_model_dir, tmp_path):
    source = tiny_model_dir("rt-gpt2", arch="gpt2")
    folder_reader = open_checkpoint(source)
    file_reader = open_checkpoint(source / "model.safetensors")
    assert file_reader.path == source / "model.safetensors"
    assert file_reader.config == folder_reader.config  # config.json beside the file
    assert file_reader.tensor_names() == folder_reader.tensor_names()
    for name in folder_reader.tensor_names():
        assert torch.equal(file_reader.get(name), folder_reader.get(name))

    sharded = tmp_path / "sharded"
    rewrite(source, sharded, shard_bytes=SHARD_BYTES)
    by_index = open_checkpoint(sharded / "model.safetensors.index.json")
    assert by_index.path == sharded
    assert sorted(by_index.tensor_names()) == sorted(folder_reader.tensor_names())
    for name in by_index.tensor_names():
        assert by_index.shape(name) == folder_reader.shape(name)
        assert torch.equal(by_index.get(name), folder_reader.get(name))


def test_tensor_names_follow_file_order(tiny_model_dir, tmp_path):
    source = tiny_model_dir("rt-llama", arch="llama")
    sharded = tmp_path / "sharded"
    rewrite(source, sharded, shard_bytes=SHARD_BYTES)
    reader = open_checkpoint(sharded)
    seen_shards = [reader.shard_path(n).name for n in reader.tensor_names()]
    # Shards are read one after another, never interleaved.
    assert seen_shards == sorted(seen_shards)
    assert re.fullmatch(r"model-00001-of-\d{5}\.safetensors", seen_shards[0])


def test_dtype_conversion_on_read(tiny_model_dir):
    reader = open_checkpoint(tiny_model_dir("rt-qwen2", arch="qwen2"))
    name = "model.layers.0.mlp.up_proj.weight"
    original = reader.get(name)
    assert original.dtype == torch.float32
    assert reader.shape(name) == tuple(original.shape) == (64, 32)
    assert reader.nbytes(name) == 64 * 32 * 4
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        converted = reader.get(name, dtype=dtype)
        assert converted.dtype == dtype
        assert torch.equal(converted, original.to(dtype))
    assert reader.dtype(name) == torch.float32  # reading converted copies changes nothing stored
