"""Random-weight Llama checkpoint sets for the merge benchmarks: a base and two noisy copies.

    python benchmarks/make_checkpoints.py --size 0.5b --out /work/bench_data/0.5b
    python benchmarks/make_checkpoints.py --size 2b --out /work/bench_data/2b

Writes ``OUT/base``, ``OUT/ft_a`` and ``OUT/ft_b``: Hugging Face folders (config.json,
bf16 safetensors shards of at most ``--shard-size`` bytes, index) that transformers loads.
Shapes and names come from a ``transformers`` LlamaConfig (the model is built on the meta
device, so no weights are allocated); each tensor is drawn, written and freed in turn, so
memory stays near one shard whatever the size. The copies are ``base + N(0, noise^2)``.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import torch

SIZES: dict[str, dict] = {
    # 0.49B parameters: the set of issue 3
    "0.5b": dict(hidden_size=1536, num_hidden_layers=16, intermediate_size=4096, vocab_size=32000,
                 num_attention_heads=12, num_key_value_heads=2),
    # 2.08B parameters
    "2b": dict(hidden_size=2048, num_hidden_layers=32, intermediate_size=8192, vocab_size=32000,
               num_attention_heads=16, num_key_value_heads=4),
    # for smoke runs of the benchmark itself
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, vocab_size=1000,
                 num_attention_heads=4, num_key_value_heads=2),
}


def llama_config(size: str):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture from this
    return config


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """Every parameter name and shape of the model ``config`` describes, without allocating it."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _write_shards(folder: Path, shapes: dict[str, tuple[int, ...]], make, shard_size: int) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if groups[-1] and used + nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    count = len(groups)
    weight_map: dict[str, str] = {}
    total = 0
    for number, names in enumerate(groups, start=1):
        file = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors = {name: make(name, shapes[name]) for name in names}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        del tensors
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _seed_of(name: str, salt: int) -> int:
    """A seed per tensor name (stable across runs, unlike ``hash``)."""
    return zlib.crc32(f"{salt}:{name}".encode())


def build_set(size: str, out: Path, *, noise: float = 0.002, shard_size: int = 2 * 10**9,
              seed: int = 0) -> list[Path]:
    """Write ``out/base``, ``out/ft_a``, ``out/ft_b``; returns the three folders."""
    config = llama_config(size)
    shapes = tensor_shapes(config)
    std = config.initializer_range

    def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_seed_of(name, seed))
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    folders = []
    for copy, salt in (("base", None), ("ft_a", 1), ("ft_b", 2)):
        folder = out / copy
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)

        def make(name: str, shape: tuple[int, ...], salt: int | None = salt) -> torch.Tensor:
            tensor = base_tensor(name, shape)
            if salt is None:
                return tensor
            gen = torch.Generator().manual_seed(_seed_of(name, seed + 1000 * salt))
            return (tensor.float() + torch.randn(shape, generator=gen) * noise).to(torch.bfloat16)

        _write_shards(folder, shapes, make, shard_size)
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--noise", type=float, default=0.002, help="std of the copies' noise")
    parser.add_argument("--shard-size", type=int, default=2 * 10**9, help="bytes per shard")
    args = parser.parse_args()
    start = time.perf_counter()
    config = llama_config(args.size)
    params = sum(int(torch.tensor(s).prod()) for s in tensor_shapes(config).values())
    folders = build_set(args.size, args.out, noise=args.noise, shard_size=args.shard_size)
    print(f"{args.size}: {params / 1e9:.3f}B parameters per model, bf16; wrote "
          f"{', '.join(str(f) for f in folders)} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
