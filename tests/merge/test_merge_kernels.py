"""The fused numba loops (``shoal.merge.fast``) write exactly what the methods' torch code writes.

Every merge here runs three ways: the reference backend, the fast backend without the fused
loops (torch chunks, or whole tensors where a method has no torch chunks), and the fast
backend on the fused loops. The last is skipped when numba (the ``fast`` extra) is not
installed; the others are tested either way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from shoal.errors import CheckpointError, MergeError
from shoal.merge import merge
from shoal.merge.execute import ExecutorOptions
from shoal.merge.methods.selection import KthLargest
from shoal.merge.methods.slerp import STATS_BLOCK

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba (the 'fast' extra) is not installed")
PATHS = ["torch", pytest.param("fused", marks=needs_numba)]

SHAPES = {  # a wide matrix (5 chunks, large enough for the sampled bracket), a square one, a vector
    "model.embed_tokens.weight": (1200, 256),
    "model.layers.0.mlp.up_proj.weight": (96, 80),
    "model.norm.weight": (256,),
}

DTYPES = {"bf16": (torch.bfloat16,) * 4, "fp16": (torch.float16,) * 4, "fp32": (torch.float32,) * 4,
          "mixed": (torch.float16, torch.bfloat16, torch.float32, torch.bfloat16)}  # base, a, b, c


def _write_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=list(DTYPES))
def quartet(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A base and three fine-tunes, with exact ties of |task vector|, zero task vectors and -0.0."""
    dtypes = DTYPES[request.param]
    root = tmp_path_factory.mktemp(f"quartet_{request.param}")
    gen = torch.Generator().manual_seed(5)
    base = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in SHAPES.items()}
    folders = [_write_model(root / "base", {k: v.to(dtypes[0]) for k, v in base.items()})]
    for i, name in enumerate("abc"):
        tuned = {}
        for key, value in base.items():
            # noise on a grid of 2^-12: |task vectors| repeat exactly even in float32
            noise = torch.round(torch.randn(value.shape, generator=gen) * 8) * 2.0**-12
            flat = (value + noise).reshape(-1)
            flat[i * 100:i * 100 + 300] = value.reshape(-1)[i * 100:i * 100 + 300]  # zero task vectors
            flat[-7:] = -0.0
            tuned[key] = flat.reshape(value.shape).to(dtypes[i + 1])
        folders.append(_write_model(root / name, tuned))
    return folders


def _recipe(variant: str, base: Path, a: Path, b: Path, c: Path) -> dict:
    if variant == "ties":  # weights that are not powers of two: the fused multiply-adds show
        return {"merge_method": "ties", "base_model": str(base),
                "models": [{"model": str(a), "parameters": {"density": 0.4, "weight": 0.3}},
                           {"model": str(b), "parameters": {"density": 0.7, "weight": 0.7}}]}
    if variant == "ties_3_models":  # one model kept whole, one dropped whole, lambda, no normalization
        return {"merge_method": "ties", "base_model": str(base), "parameters": {"lambda": 0.8, "normalize": False},
                "models": [{"model": str(a), "parameters": {"density": 1.0, "weight": 0.45}},
                           {"model": str(b), "parameters": {"density": 0.0, "weight": 0.6}},
                           {"model": str(c), "parameters": {"density": 0.55, "weight": 1.1}}]}
    if variant == "ties_mergekit":
        return {"merge_method": "ties", "base_model": str(base), "compat": "mergekit",
                "parameters": {"lambda": 1.3},
                "models": [{"model": str(a), "parameters": {"density": 0.5, "weight": 0.6}},
                           {"model": str(b), "parameters": {"density": 0.35, "weight": 0.45}}]}
    if variant == "dare_ties":
        return {"merge_method": "dare_ties", "base_model": str(base), "seed": 11,
                "models": [{"model": str(a), "parameters": {"density": 0.4, "weight": 0.3}},
                           {"model": str(b), "parameters": {"density": 0.7, "weight": 0.7}}]}
    if variant == "dare_ties_no_rescale":
        return {"merge_method": "dare_ties", "base_model": str(base), "seed": 3,
                "parameters": {"rescale": False, "normalize": False, "lambda": 0.9},
                "models": [{"model": str(a), "parameters": {"density": 0.3, "weight": 0.55}},
                           {"model": str(b), "parameters": {"density": 1.0, "weight": 0.35}},
                           {"model": str(c), "parameters": {"density": 0.0, "weight": 0.25}}]}
    raise ValueError(variant)


VARIANTS = ["ties", "ties_3_models", "ties_mergekit", "dare_ties", "dare_ties_no_rescale"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _options(path: str) -> ExecutorOptions:
    # the embedding spans 3 chunks of the fused loops
    return ExecutorOptions(chunk=STATS_BLOCK, fused_chunks=2, fused=path == "fused")


def _count_fused(monkeypatch, path: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Counts the fused loops' calls."""
    calls = {"fused": 0}
    if path == "fused":
        from shoal.merge.fast import fused as kernels

        for name in ("ties_merge", "dare_merge"):
            real = getattr(kernels, name)

            def counting(*args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
                calls["fused"] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(kernels, name, counting)
    return calls


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_paths_are_bitwise_the_reference(tmp_path: Path, quartet, variant: str, path: str,
                                                        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(variant, *quartet)))
    merge(recipe, tmp_path / "simple", options=ExecutorOptions(backend="reference"))
    calls = _count_fused(monkeypatch, path)
    merge(recipe, tmp_path / "fast", options=_options(path))
    if path == "fused":
        assert calls["fused"] > len(SHAPES)  # every tensor, in several chunks
    simple, fast = _tensors(tmp_path / "simple"), _tensors(tmp_path / "fast")
    assert set(simple) == set(fast) == set(SHAPES)
    for name in SHAPES:
        assert fast[name].dtype == simple[name].dtype
        assert torch.equal(fast[name].view(torch.uint8), simple[name].view(torch.uint8)), name


@pytest.mark.parametrize("path", PATHS)
def test_nan_in_a_source_raises_the_readers_error(tmp_path: Path, path: str,
                                                  monkeypatch) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(600, 512, generator=gen).to(torch.bfloat16)
    tuned = base.float() + 0.01
    tuned[300, 7] = float("nan")
    folders = [_write_model(tmp_path / "base", {"w": base}),
               _write_model(tmp_path / "a", {"w": tuned.to(torch.bfloat16)}),
               _write_model(tmp_path / "b", {"w": (base.float() - 0.01).to(torch.bfloat16)})]
    for variant in ("ties", "dare_ties"):
        recipe = tmp_path / f"{variant}.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(variant, *folders, folders[2])))
        with pytest.raises(CheckpointError, match="'w'.*NaN"):
            merge(recipe, tmp_path / f"out_{variant}", options=_options(path))


@pytest.mark.parametrize("path", PATHS)
def test_overflow_in_the_result_raises(tmp_path: Path, path: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base = torch.full((70_000,), 3.0e38).to(torch.bfloat16)
    folders = [_write_model(tmp_path / "base", {"w": base}),
               _write_model(tmp_path / "a", {"w": torch.full((70_000,), 3.3e38).to(torch.bfloat16)}),
               _write_model(tmp_path / "b", {"w": torch.full((70_000,), 3.3e38).to(torch.bfloat16)})]
    recipe = tmp_path / "ties.yaml"
    recipe_dict = _recipe("ties", *folders, folders[2])
    recipe_dict["parameters"] = {"lambda": 4.0}
    recipe.write_text(yaml.safe_dump(recipe_dict))
    with pytest.raises(MergeError, match="'w' contains NaN or Inf"):
        merge(recipe, tmp_path / "out", options=_options(path))


@needs_numba
def test_bf16_rounding_is_torchs() -> None:
    from shoal.merge.fast import fused as kernels

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint32)
    edges = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0xFF7FFFFF,
                      0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x3F808000,
                      0x3F818000, 0x3F807FFF, 0x3F808001, 0x007FFFFF], dtype=np.uint32)
    values = np.concatenate([edges, bits]).view(np.float32)
    got = np.empty(values.size, np.uint16)
    kernels.to_bf16_bits(values, got)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.uint16).numpy()
    nan = np.isnan(values)
    assert np.array_equal(got[~nan], expected[~nan])
    assert np.isnan(torch.from_numpy(got[nan].copy()).view(torch.bfloat16).float().numpy()).all()


@needs_numba
def test_torch_add_with_alpha_is_known_to_be_fused_or_not() -> None:
    from shoal.merge.fast import fused as kernels

    from shoal.merge.fast import load_kernels

    assert kernels.torch_fuses_alpha() in (True, False)
    assert load_kernels() is kernels


@needs_numba
@pytest.mark.parametrize("bounds", ["both", "below", "above", "none"])
def test_scan_is_kth_largest_scan(bounds: str) -> None:
    from shoal.merge.fast import fused as kernels

    gen = torch.Generator().manual_seed(8)
    base = (torch.randn(50_000, generator=gen) * 0.02).to(torch.bfloat16)
    model = (base.float() + torch.randn(50_000, generator=gen) * 0.002).to(torch.bfloat16)
    magnitudes = (model.float() - base.float()).abs()
    search = KthLargest(20_000, 50_000, magnitudes[::7])
    assert search.lo is not None and search.hi is not None
    if bounds in ("above", "none"):
        search.lo = None
    if bounds in ("below", "none"):
        search.hi = None
    above, distinct, counts = search.scan(magnitudes)
    lo = np.float32(float(search.lo)) if search.lo is not None else np.float32(0.0)
    hi = np.float32(float(search.hi)) if search.hi is not None else np.float32(0.0)
    got = kernels.ties_scan(kernels.as_input(base), kernels.as_input(model), lo, hi, search.lo is not None,
                            search.hi is not None, kernels.scratch(50_000))
    assert got[0] == above
    assert torch.equal(torch.from_numpy(got[1]), distinct)
    assert torch.equal(torch.from_numpy(got[2]), counts)
    assert got[3] is True


@needs_numba
def test_scan_tally_with_a_wide_bracket_and_nan() -> None:
    """float32 magnitudes spread over many binades (three radix passes) tally as torch.unique does."""
    from shoal.merge.fast import fused as kernels

    gen = torch.Generator().manual_seed(9)
    base = torch.randn(70_001, generator=gen)
    model = base + torch.randn(70_001, generator=gen) * torch.logspace(-30, 3, 70_001)
    magnitudes = (model - base).abs()
    lo, hi = np.float32(1e-20), np.float32(1e2)
    model[17] = float("nan")  # not in any bracket, and the sources are not finite
    above, distinct, counts, finite = kernels.ties_scan(kernels.as_input(base), kernels.as_input(model), lo, hi,
                                                        True, True, kernels.scratch(70_001))
    keep = torch.ones(70_001, dtype=torch.bool)
    keep[17] = False
    expected = torch.unique(magnitudes[keep & (magnitudes >= float(lo)) & (magnitudes <= float(hi))],
                            sorted=True, return_counts=True)
    assert above == int((magnitudes[keep] > float(hi)).sum())
    assert torch.equal(torch.from_numpy(distinct), expected[0])
    assert torch.equal(torch.from_numpy(counts), expected[1])
    assert finite is False


@needs_numba
def test_scan_tally_over_short_lengths_and_every_lane_pattern() -> None:
    """Lengths around the vector width (the packed lanes and the scalar tail), brackets from one value to all."""
    from shoal.merge.fast import fused as kernels

    rng = np.random.default_rng(12)
    for n in list(range(1, 40)) + [255, 256, 257, 4099]:
        base = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.02).to(torch.bfloat16)
        noise = torch.from_numpy(np.round(rng.standard_normal(n) * 4).astype(np.float32)) * 2.0**-12
        model = (base.float() + noise).to(torch.bfloat16)  # magnitudes repeat: ties inside the bracket
        magnitudes = (model.float() - base.float()).abs()
        ordered = magnitudes.sort().values
        for lo_at, hi_at in ((0, n - 1), (n // 3, n // 2), (n // 2, n // 2), (n - 1, n - 1)):
            lo, hi = np.float32(ordered[lo_at]), np.float32(ordered[hi_at])
            above, distinct, counts, finite = kernels.ties_scan(
                kernels.as_input(base), kernels.as_input(model), lo, hi, True, True, kernels.scratch(n))
            inside = magnitudes[(magnitudes >= float(lo)) & (magnitudes <= float(hi))]
            expected = torch.unique(inside, sorted=True, return_counts=True)
            assert above == int((magnitudes > float(hi)).sum())
            assert torch.equal(torch.from_numpy(distinct), expected[0]), (n, lo_at, hi_at)
            assert torch.equal(torch.from_numpy(counts), expected[1]), (n, lo_at, hi_at)
            assert finite is True


def test_tallied_thresholds_are_the_kth_largest_of_a_stable_sort() -> None:
    """The one k-th-largest rule (bracket, tallies, ties by flat order) against a plain stable sort."""
    from shoal.merge.methods.selection import bracket_values, kth_in_tallies, ties_taken

    gen = torch.Generator().manual_seed(4)
    values = (torch.randn(300_000, generator=gen) * 0.01).to(torch.bfloat16).float().abs()  # many ties
    order = torch.sort(-values, stable=True).indices  # largest first, ties by index
    for k in (1, 777, 150_000, 299_999):
        expected = torch.zeros(values.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        search = KthLargest(k, values.numel(), values[::5])
        lo, hi = bracket_values(k, values.numel(), np.sort(values[::5].numpy()))
        as_float = lambda v: None if v is None else float(v)  # noqa: E731
        assert (as_float(lo), as_float(hi)) == (as_float(search.lo), as_float(search.hi))
        pieces = [values[i:i + 40_000] for i in range(0, values.numel(), 40_000)]
        scans = [(a, d.numpy(), c.numpy()) for a, d, c in (search.scan(piece) for piece in pieces)]
        index = kth_in_tallies(k, sum(s[0] for s in scans), np.concatenate([s[1] for s in scans]),
                               np.concatenate([s[2] for s in scans]))
        assert index is not None
        threshold = np.concatenate([s[1] for s in scans])[index]
        assert threshold == values[order[k - 1]]
        got = []
        for piece, (here, tied) in zip(pieces, ties_taken(k, scans, threshold)):
            keep = piece > float(threshold)
            ties = torch.nonzero(piece == float(threshold)).squeeze(1)
            assert tied == ties.numel()
            keep[ties[:here]] = True
            got.append(keep)
        assert torch.equal(torch.cat(got), expected)
