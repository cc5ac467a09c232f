"""The fast (chunked, threaded) backend writes exactly what the reference backend writes.

The reference backend (one whole tensor at a time through ``compute_op``) is the reference.
Tensors here are large enough to span several chunks (the chunk size is lowered to its
minimum) and, in bf16, full of exact ties at the TIES threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import shoal.merge.execute as execute
from shoal.checkpoint import open_checkpoint
from shoal.checkpoint.writer import ShardWriter, shard_groups
from shoal.merge import merge
from shoal.merge.execute import ExecutorOptions
from shoal.merge.fast import load_kernels
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


CHUNKED = [("dare_ties", "paper"), ("linear", "paper"), ("slerp", "paper")]
FUSED_ONLY = [("ties", "paper"), ("ties", "mergekit")]  # chunked with the fused loops, else whole
WHOLE = [("dare_ties", "mergekit"), ("della", "paper"), ("breadcrumbs_ties", "paper")]  # whole-tensor ops


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("method,compat", CHUNKED + FUSED_ONLY + WHOLE)
def test_fast_backend_is_bitwise_the_reference(tmp_path: Path, trio, method: str, compat: str, fused: bool,
                                               monkeypatch) -> None:  # type: ignore[no-untyped-def]
    recipe_dict = _recipe(method, *trio, compat)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict))
    calls = {"whole": 0}
    real = execute.compute_op

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["whole"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "compute_op", counting)
    merge(recipe, tmp_path / "simple", options=ExecutorOptions(backend="reference"))
    assert calls["whole"] == len(SHAPES)
    calls["whole"] = 0
    # the embedding spans 5 chunks; several shards, split as the reference backend splits them
    merge(recipe, tmp_path / "fast", shard_size=300_000,
          options=ExecutorOptions(chunk=STATS_BLOCK, fused_chunks=1, fused=fused))
    chunked = (method, compat) in CHUNKED or ((method, compat) in FUSED_ONLY and fused and load_kernels())
    # every op went through its method's chunks, or (where it has none) the pipelined whole-tensor path
    assert calls["whole"] == (0 if chunked else len(SHAPES))
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


def test_shard_writer_writes_pieces_in_any_order_into_planned_shards(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(shape, generator=gen).to(dtype) for i, (shape, dtype) in
               enumerate([((100, 10), torch.float32), ((7,), torch.bfloat16), ((300,), torch.float16),
                          ((50, 50), torch.float32), ((3,), torch.float32)])}
    sizes = [(n, t.numel() * t.element_size()) for n, t in tensors.items()]
    # a shard closes before a tensor that would overflow it, or once full; a large tensor is alone
    assert shard_groups(sizes, 5000) == [["t0", "t1", "t2"], ["t3"], ["t4"]]
    writer = ShardWriter(tmp_path / "planned", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                         max_shard_bytes=5000)
    for name, tensor in reversed(tensors.items()):  # any order, and in two pieces
        flat = tensor.reshape(-1)
        half = flat.numel() // 2
        writer.write(name, flat[half:], half)
        writer.write(name, flat[:half], 0)
    weight_map = writer.close()
    assert weight_map == {"t0": "model-00001-of-00003.safetensors", "t1": "model-00001-of-00003.safetensors",
                          "t2": "model-00001-of-00003.safetensors", "t3": "model-00002-of-00003.safetensors",
                          "t4": "model-00003-of-00003.safetensors"}
    index = json.loads((tmp_path / "planned" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == sum(s for _, s in sizes)
    got = _tensors(tmp_path / "planned")
    for name, tensor in tensors.items():
        assert torch.equal(got[name], tensor)


def test_read_ranges_match_the_stored_tensor(tmp_path: Path) -> None:
    tensor = torch.arange(1000, dtype=torch.float32).reshape(40, 25).to(torch.bfloat16)
    folder = _write_model(tmp_path / "m", {"w": tensor, "v": torch.ones(3)})
    reader = open_checkpoint(folder)
    assert torch.equal(reader.read_ranges("w", [(0, 1000)]), tensor.reshape(-1))
    assert torch.equal(reader.read_ranges("w", [(37, 555)]), tensor.reshape(-1)[37:555])
    with pytest.raises(ValueError):
        reader.read_ranges("w", [(10, 1001)])


def test_get_matches_safetensors_and_checks_finiteness(tmp_path: Path) -> None:
    from shoal.errors import CheckpointError

    bad = torch.ones(4, 5)
    bad[2, 3] = float("nan")
    stored = {"w": torch.randn(40, 25).to(torch.bfloat16), "s": torch.tensor(2.5), "e": torch.ones(0, 3),
              "bad": bad}
    folder = _write_model(tmp_path / "m", stored)
    reader = open_checkpoint(folder)
    for name in ("w", "s", "e"):
        got = reader.get(name)
        assert got.dtype == stored[name].dtype and got.shape == stored[name].shape
        assert torch.equal(got, stored[name])
    assert torch.equal(reader.get("w", dtype=torch.float32), stored["w"].float())
    with pytest.raises(CheckpointError, match="'bad' contains 1 NaN or Inf"):
        reader.get("bad")


def test_map_range_matches_read_range_and_lets_pages_go(tmp_path: Path) -> None:
    tensor = torch.randn(300_000).to(torch.bfloat16)
    save_file({"a": torch.ones(3), "w": tensor}, str(tmp_path / "model.safetensors"))
    reader = open_checkpoint(tmp_path / "model.safetensors")
    view = reader.map_range("w", 1234, 250_000)
    assert torch.equal(view, reader.read_ranges("w", [(1234, 250_000)]))
    assert reader.map_range("w", 7, 7).numel() == 0
    reader.release_range("w", 1234, 250_000)
    assert torch.equal(view, tensor[1234:250_000])  # read again from the file after a release
    with pytest.raises(ValueError):
        reader.map_range("w", 0, 300_001)
    reader.close()


def test_read_ranges_concatenates_ranges(tmp_path: Path) -> None:
    tensor = torch.randn(5000).to(torch.float16)
    save_file({"w": tensor}, str(tmp_path / "model.safetensors"))
    reader = open_checkpoint(tmp_path / "model.safetensors")
    bounds = [(0, 10), (100, 1124), (4990, 5000), (7, 7)]
    assert torch.equal(reader.read_ranges("w", bounds), torch.cat([tensor[a:b] for a, b in bounds]))
    assert reader.read_ranges("w", []).numel() == 0
    reader.close()


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_copy_ops_write_renamed_and_converted_tensors(tmp_path: Path, trio, backend: str) -> None:
    """``write_tensor_ops`` with :meth:`TensorOp.copy` (what layer-path export builds on): any names, any order."""
    from shoal.merge import write_tensor_ops
    from shoal.merge.plan import SourceRef, TensorOp

    base, a, _ = trio
    with open_checkpoint(base) as first, open_checkpoint(a) as second:
        readers = {"first": first, "second": second}
        ops = [TensorOp.copy("renamed.embed", SourceRef("second", "model.embed_tokens.weight"), (1200, 256),
                             torch.float32),
               TensorOp.copy("model.norm.weight", SourceRef("first", "model.norm.weight"), (256,),
                             first.dtype("model.norm.weight"))]
        written = write_tensor_ops(ops, readers, tmp_path / "out", shard_size=200_000,
                                   options=ExecutorOptions(backend=backend, chunk=STATS_BLOCK))
        got = _tensors(tmp_path / "out")
        assert written == 1200 * 256 * 4 + 256 * first.dtype("model.norm.weight").itemsize
        assert torch.equal(got["renamed.embed"], second.get("model.embed_tokens.weight", dtype=torch.float32))
        assert torch.equal(got["model.norm.weight"], first.get("model.norm.weight"))


@pytest.mark.parametrize("method,compat", [("linear", "paper"), ("slerp", "paper"), ("dare_ties", "paper"),
                                           ("ties", "paper"), ("ties", "mergekit")])
def test_float32_output_over_bf16_inputs_is_computed_in_float32_by_both_backends(
        tmp_path: Path, tmp_path_factory, method: str, compat: str) -> None:  # type: ignore[no-untyped-def]
    """``dtype: float32`` over bf16 sources: one rounding, to float32 (mergekit's values), chunked or whole."""
    root = tmp_path_factory.mktemp("bf16_trio")
    gen = torch.Generator().manual_seed(1)
    base = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in SHAPES.items()}
    folders = [_write_model(root / "base", {k: v.to(torch.bfloat16) for k, v in base.items()})]
    for name in ("a", "b"):
        noisy = {k: (v + torch.randn(v.shape, generator=gen) * 0.002).to(torch.bfloat16) for k, v in base.items()}
        folders.append(_write_model(root / name, noisy))
    recipe_dict = {**_recipe(method, *folders, compat), "dtype": "float32"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict))
    merge(recipe, tmp_path / "simple", options=ExecutorOptions(backend="reference"))
    merge(recipe, tmp_path / "fast", options=ExecutorOptions(chunk=STATS_BLOCK, fused_chunks=1))
    simple, fast = _tensors(tmp_path / "simple"), _tensors(tmp_path / "fast")
    for name in SHAPES:
        assert simple[name].dtype == fast[name].dtype == torch.float32
        assert torch.equal(fast[name].view(torch.uint8), simple[name].view(torch.uint8)), name
    embed = simple["model.embed_tokens.weight"]
    assert not torch.equal(embed, embed.to(torch.bfloat16).to(torch.float32))  # not rounded to bf16 on the way
    if method == "linear":  # the weighted mean of the widened sources, in float32
        a, b = (load_file(f / "model.safetensors")["model.embed_tokens.weight"].float() for f in folders[1:])
        torch.testing.assert_close(embed, (0.3 * a + 0.7 * b) / 1.0, rtol=1e-6, atol=1e-7)
