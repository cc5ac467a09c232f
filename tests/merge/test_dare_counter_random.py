"""DARE's seed contract: counter-based draws (Philox4x32-10) keyed by seed, tensor, model and entry.

The draws are checked against a plain per-entry Philox written here from the paper's
definition (and against Random123's published known answers); merges against themselves
across chunk sizes, thread counts and the fused loops; the keep rate statistically.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from shoal.merge import merge
from shoal.merge.execute import ExecutorOptions
from shoal.merge.methods.randomness import EntryRandom, keep_threshold
from shoal.merge.plan import tensor_seed
from shoal.merge.registry import get_method

HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def philox_reference(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10, one block, in plain Python integers (Salmon et al. 2011)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        if round_ < 9:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def draw_reference(key: int, model: int, index: int) -> int:
    """The contract: word ``index mod 4`` of Philox(counter=(block lo, block hi, model, 0), key=(lo, hi))."""
    block = index // 4
    words = philox_reference((block & 0xFFFFFFFF, block >> 32, model, 0), (key & 0xFFFFFFFF, key >> 32))
    return words[index % 4]


def test_philox_reference_gives_random123s_known_answers() -> None:
    assert philox_reference((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox_reference((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                                       0x6D5451FD)
    assert philox_reference((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("start,count", [(0, 37), (3, 10), (2**33 + 1, 9), (4 * 2**32 - 2, 7)])
def test_entry_draws_are_the_contracts(start: int, count: int) -> None:
    key = tensor_seed(42, "model.layers.3.mlp.up_proj.weight")
    for model in (0, 1, 5):
        got = EntryRandom(key).at(start).bits(model, count).tolist()
        assert got == [draw_reference(key, model, start + j) for j in range(count)]


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba (the 'fast' extra) is not installed")
@pytest.mark.parametrize("start,count", [(0, 1000), (1, 999), (6, 3), (2**33 + 2, 50)])
def test_fused_masks_are_the_torch_masks(start: int, count: int) -> None:
    from shoal.merge.fast import fused

    key = tensor_seed(7, "w")
    for density in (0.1, 0.5, 0.93):
        expected = EntryRandom(key).at(start).keep(2, (count,), density).numpy()
        got = np.empty(count, np.uint8)
        fused.philox_keep(key, 2, start, keep_threshold(density), got)
        assert np.array_equal(got.astype(bool), expected)
        threshold = keep_threshold(density)
        assert expected.tolist() == [draw_reference(key, 2, start + j) < threshold for j in range(count)]


def test_keep_rate_and_independence() -> None:
    n = 1 << 20
    random = EntryRandom(tensor_seed(0, "t"))
    for density in (0.05, 0.3, 0.5, 0.9):
        kept = random.keep(0, (n,), density)
        sigma = math.sqrt(density * (1 - density) / n)
        assert abs(kept.float().mean().item() - density) < 5 * sigma
    a, b = random.keep(0, (n,), 0.5), random.keep(1, (n,), 0.5)
    other = EntryRandom(tensor_seed(0, "u")).keep(0, (n,), 0.5)
    for x, y in ((a, b), (a, other)):  # models and tensors draw independently: agreement ~ 1/2
        assert abs((x == y).float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
    probability = torch.linspace(0, 1, n)  # DELLA's per-entry probabilities: rate follows them
    kept = random.keep(0, (n,), probability)
    assert abs(kept[: n // 4].float().mean().item() - 0.125) < 0.01
    assert not kept[0] and bool(kept[-1])


def test_the_method_drops_the_contracts_entries() -> None:
    """One model, no rescaling, weight 1: each entry is the fine-tune's where kept, the base's elsewhere."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(30, 7, generator=gen)
    model = base + torch.randn(30, 7, generator=gen)
    key = tensor_seed(9, "x")
    threshold = keep_threshold(0.35)
    keep = torch.tensor([draw_reference(key, 0, i) < threshold for i in range(base.numel())]).reshape(base.shape)
    got = get_method("dare_linear").fn(base, [model], weight=1.0, density=0.35, rescale=False,
                                      generator=EntryRandom(key))
    assert torch.equal(got, torch.where(keep, model, base))


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def trio(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("dare")
    gen = torch.Generator().manual_seed(1)
    shapes = {"model.embed_tokens.weight": (1100, 300), "model.norm.weight": (300,)}  # 5 chunks of 65536
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    folders = [_write(root / "base", {k: v.to(request.param) for k, v in base.items()})]
    for name in ("a", "b"):
        folders.append(_write(root / name, {k: (v + torch.randn(v.shape, generator=gen) * 0.01).to(request.param)
                                            for k, v in base.items()}))
    return folders


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della"])
def test_same_merge_in_any_chunking_and_thread_count(tmp_path: Path, trio, method: str) -> None:
    base, a, b = trio
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(base), "seed": 5,
        "models": [{"model": str(a), "parameters": {"density": 0.4, "weight": 0.6}},
                   {"model": str(b), "parameters": {"density": 0.7, "weight": 0.5}}]}))
    runs = {"reference": ExecutorOptions(backend="reference"),
            "small_1_thread": ExecutorOptions(chunk=1 << 16, fused_chunks=1, workers=1),
            "small_3_threads": ExecutorOptions(chunk=1 << 16, fused_chunks=3, workers=3),
            "torch_chunks": ExecutorOptions(chunk=3 << 16, fused=False, workers=2),
            "default": ExecutorOptions()}
    outputs = {}
    for name, options in runs.items():
        merge(recipe, tmp_path / name, options=options)
        outputs[name] = _tensors(tmp_path / name)
    reference = outputs.pop("reference")
    for name, tensors in outputs.items():
        for key, tensor in reference.items():
            assert torch.equal(tensors[key].view(torch.uint8), tensor.view(torch.uint8)), (name, key)


def test_compat_mergekit_keeps_the_sequential_generator(tmp_path: Path, trio) -> None:
    base, a, b = trio
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": str(base), "seed": 5, "compat": "mergekit",
        "models": [{"model": str(a), "parameters": {"density": 0.4, "weight": 0.6}},
                   {"model": str(b), "parameters": {"density": 0.7, "weight": 0.5}}]}))
    merge(recipe, tmp_path / "out")
    got = _tensors(tmp_path / "out")
    sources = [load_file(str(folder / "model.safetensors")) for folder in (base, a, b)]
    for name, tensor in got.items():
        expected = get_method("dare_ties").fn(
            sources[0][name], [sources[1][name], sources[2][name]], weight=[0.6, 0.5], density=[0.4, 0.7],
            generator=torch.Generator().manual_seed(tensor_seed(5, name)), compat="mergekit")
        assert torch.equal(tensor, expected), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_masks_are_the_same_on_the_gpu() -> None:
    random = EntryRandom(tensor_seed(3, "w")).at(12345)
    assert torch.equal(random.keep(1, (1000, 77), 0.3, "cuda").cpu(), random.keep(1, (1000, 77), 0.3))
    probability = torch.rand(1000, 77)
    assert torch.equal(random.keep(0, (1000, 77), probability.cuda(), "cuda").cpu(),
                       random.keep(0, (1000, 77), probability))


def test_della_draws_in_flat_order_whatever_the_shape() -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 4, 5, generator=gen)
    models = [base + 0.1 * torch.randn(3, 4, 5, generator=gen) for _ in range(2)]
    della = get_method("della").fn
    kwargs = dict(density=[0.5, 0.6], epsilon=0.2, generator=EntryRandom(11))
    cube = della(base, models, **kwargs)
    rows = della(base.reshape(12, 5), [m.reshape(12, 5) for m in models], **kwargs)  # same rows, same flat order
    assert torch.equal(cube.reshape(12, 5), rows)
