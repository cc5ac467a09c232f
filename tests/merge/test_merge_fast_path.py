"""The fast (streamed, chunked, threaded) executor writes exactly what the simple one writes.

The simple executor (``streamed=False``: one whole tensor at a time through ``compute_op``)
is the reference. Tensors here are large enough to span several chunks (the chunk size is
lowered to its minimum) and, in bf16, full of exact ties at the TIES threshold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import shoal.merge.streamed as streamed
from shoal.checkpoint import open_checkpoint
from shoal.checkpoint.writer import PlannedShardWriter, ShardedWriter
from shoal.merge import merge
from shoal.merge.methods.selection import top_k_mask
from shoal.merge.methods.slerp import STATS_BLOCK

SHAPES = {  # a wide embedding (several chunks), a square matrix, a vector
    "model.embed_tokens.weight": (1200, 256),
    "model.layers.0.self_attn.q_proj.weight": (128, 128),
    "model.norm.weight": (256,),
}


def _write_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def trio(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    dtype = request.param
    root = tmp_path_factory.mktemp(f"trio_{str(dtype).split('.')[-1]}")
    gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in SHAPES.items()}
    folders = [_write_model(root / "base", {k: v.to(dtype) for k, v in base.items()})]
    for name in ("a", "b"):
        noisy = {k: (v + torch.randn(v.shape, generator=gen) * 0.002).to(dtype) for k, v in base.items()}
        folders.append(_write_model(root / name, noisy))
    return folders


def _recipe(method: str, base: Path, a: Path, b: Path, compat: str) -> dict:
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                                                     {"model": str(b), "parameters": {"weight": 0.7}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
                "parameters": {"t": 0.3}}
    recipe = {"merge_method": method, "base_model": str(base), "seed": 7,
              "models": [{"model": str(a), "parameters": {"density": 0.4, "weight": 0.6}},
                         {"model": str(b), "parameters": {"density": 0.7, "weight": 0.5}}]}
    if compat == "mergekit":
        recipe["compat"] = "mergekit"
    return recipe


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


STREAMED = [("ties", "paper"), ("ties", "mergekit"), ("dare_ties", "paper"), ("linear", "paper"),
            ("slerp", "paper")]
WHOLE = [("dare_ties", "mergekit"), ("della", "paper"), ("breadcrumbs_ties", "paper")]  # whole-tensor ops


@pytest.mark.parametrize("method,compat", STREAMED + WHOLE)
def test_fast_executor_is_bitwise_the_simple_one(tmp_path: Path, trio, method: str, compat: str,
                                                 monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(streamed, "CHUNK", STATS_BLOCK)  # the embedding spans 5 chunks
    monkeypatch.setattr(streamed, "FUSED_CHUNKS", 1)  # also for the fused loops
    recipe_dict = _recipe(method, *trio, compat)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict))
    calls = {"streamed": 0}
    real = streamed.start_streamed

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["streamed"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(streamed, "start_streamed", counting)
    merge(recipe, tmp_path / "simple", streamed=False)
    assert calls["streamed"] == 0
    merge(recipe, tmp_path / "fast", shard_size=300_000)  # several shards, split like the simple writer's
    # every op went through the chunked path, or (methods it does not stream) the pipelined whole-tensor one
    assert calls["streamed"] == (len(SHAPES) if (method, compat) in STREAMED else 0)
    simple, fast = _tensors(tmp_path / "simple"), _tensors(tmp_path / "fast")
    assert set(simple) == set(fast) == set(SHAPES)
    for name in SHAPES:
        assert fast[name].dtype == simple[name].dtype
        assert torch.equal(fast[name].view(torch.uint8), simple[name].view(torch.uint8)), name
    reader = open_checkpoint(tmp_path / "fast")  # the index and shard headers validate
    assert sorted(reader.tensor_names()) == sorted(SHAPES)


def test_top_k_mask_on_large_tied_tensor_matches_a_stable_sort() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = (torch.randn(400_000, generator=gen) * 0.01).to(torch.bfloat16).float().abs()  # many ties
    for k in (1, 1000, 123_457, 200_000, 399_999):
        order = torch.sort(-scores, stable=True).indices  # largest first, ties by index
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(top_k_mask(scores, k), expected), k


def test_planned_writer_splits_shards_like_the_sharded_writer(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(shape, generator=gen).to(dtype) for i, (shape, dtype) in
               enumerate([((100, 10), torch.float32), ((7,), torch.bfloat16), ((300,), torch.float16),
                          ((50, 50), torch.float32), ((3,), torch.float32)])}
    simple = ShardedWriter(tmp_path / "simple", max_shard_bytes=5000)
    for name, tensor in tensors.items():
        simple.add(name, tensor)
    expected_map = simple.close()
    planned = PlannedShardWriter(tmp_path / "planned", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                                 max_shard_bytes=5000)
    for name, tensor in reversed(tensors.items()):  # any order, and in two pieces
        flat = tensor.reshape(-1)
        half = flat.numel() // 2
        planned.write(name, flat[half:], half)
        planned.write(name, flat[:half], 0)
    assert planned.close() == expected_map
    assert (tmp_path / "planned" / "model.safetensors.index.json").read_text() == \
        (tmp_path / "simple" / "model.safetensors.index.json").read_text()
    got = _tensors(tmp_path / "planned")
    for name, tensor in tensors.items():
        assert torch.equal(got[name], tensor)


def test_read_range_matches_get(tmp_path: Path) -> None:
    tensor = torch.arange(1000, dtype=torch.float32).reshape(40, 25).to(torch.bfloat16)
    folder = _write_model(tmp_path / "m", {"w": tensor, "v": torch.ones(3)})
    reader = open_checkpoint(folder)
    assert torch.equal(reader.read_range("w", 0, 1000), reader.get("w").reshape(-1))
    assert torch.equal(reader.read_range("w", 37, 555), tensor.reshape(-1)[37:555])
    with pytest.raises(ValueError):
        reader.read_range("w", 10, 1001)


def test_read_whole_is_get_without_a_memory_map(tmp_path: Path) -> None:
    from shoal.errors import CheckpointError

    bad = torch.ones(4, 5)
    bad[2, 3] = float("nan")
    folder = _write_model(tmp_path / "m", {"w": torch.randn(40, 25).to(torch.bfloat16), "s": torch.tensor(2.5),
                                           "bad": bad})
    reader = open_checkpoint(folder)
    for name in ("w", "s"):
        got = reader.read_whole(name)
        assert got.dtype == reader.get(name).dtype and got.shape == reader.get(name).shape
        assert torch.equal(got, reader.get(name))
    with pytest.raises(CheckpointError, match="'bad' contains 1 NaN or Inf"):
        reader.read_whole("bad")


def test_map_range_matches_read_range_and_lets_pages_go(tmp_path: Path) -> None:
    tensor = torch.randn(300_000).to(torch.bfloat16)
    save_file({"a": torch.ones(3), "w": tensor}, str(tmp_path / "model.safetensors"))
    reader = open_checkpoint(tmp_path / "model.safetensors")
    view = reader.map_range("w", 1234, 250_000)
    assert torch.equal(view, reader.read_range("w", 1234, 250_000))
    assert reader.map_range("w", 7, 7).numel() == 0
    reader.release_range("w", 1234, 250_000)
    assert torch.equal(view, tensor[1234:250_000])  # read again from the file after a release
    with pytest.raises(ValueError):
        reader.map_range("w", 0, 300_001)
    reader.close()


def test_read_ranges_concatenates_read_range(tmp_path: Path) -> None:
    tensor = torch.randn(5000).to(torch.float16)
    save_file({"w": tensor}, str(tmp_path / "model.safetensors"))
    reader = open_checkpoint(tmp_path / "model.safetensors")
    bounds = [(0, 10), (100, 1124), (4990, 5000), (7, 7)]
    assert torch.equal(reader.read_ranges("w", bounds), torch.cat([tensor[a:b] for a, b in bounds]))
    assert reader.read_ranges("w", []).numel() == 0
    reader.close()
