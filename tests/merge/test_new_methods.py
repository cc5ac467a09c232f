"""New merge methods against independent references written here, entry by entry."""

from __future__ import annotations

import pytest
import torch

from shoal.errors import RecipeError
from shoal.merge.methods.nearswap import nearswap


def _nearswap_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    out = torch.empty(a.numel(), dtype=torch.float64)
    for i, (x, y) in enumerate(zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())):
        distance = max(abs(x - y), 1e-6)
        w = min(1.0, t / distance)
        out[i] = w * y + (1 - w) * x
    return out.reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 1e-4, 0.01, 0.05, 10.0])
def test_nearswap_matches_the_formula_entry_by_entry(t: float) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.1
    b = a + torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.02
    b[0, 0] = a[0, 0]  # equal entries: the 1e-6 floor, no division by zero
    got = nearswap(a, [b], t=t)
    torch.testing.assert_close(got, _nearswap_reference(a, b, t), rtol=1e-12, atol=1e-15)


def test_nearswap_extremes_and_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=gen).to(torch.bfloat16)
    b = (a.float() + 0.5).to(torch.bfloat16)
    assert torch.equal(nearswap(a, [b], t=0.0), a)  # t = 0: the base
    assert torch.equal(nearswap(a, [b], t=100.0), b)  # every entry within t: the other model
    assert nearswap(a, [b], t=0.1).dtype == torch.bfloat16


def test_nearswap_refuses_negative_t() -> None:
    with pytest.raises(RecipeError, match="t must be >= 0"):
        nearswap(torch.zeros(2), [torch.ones(2)], t=-1.0)


def test_nearswap_gives_mergekits_golden(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The function on the golden's checkpoints gives mergekit 0.1.5's ``f_nearswap_fp32`` output."""
    import importlib.util
    import json
    import lzma
    import sys
    from pathlib import Path

    from safetensors.torch import load, load_file

    goldens = Path(__file__).resolve().parents[1] / "goldens"
    name = "shoal_golden_tiny_checkpoints"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, goldens / "tiny_checkpoints.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    builder = sys.modules[name]
    recorded = json.loads((goldens / "mergekit" / "checkpoints.json").read_text())["digests"]
    for ckpt in ("llama_a_fp32", "llama_b_fp32"):
        assert builder.build_checkpoint(ckpt, tmp_path / ckpt) == recorded[ckpt]
    golden = json.loads((goldens / "mergekit" / "f_nearswap_fp32.json").read_text())
    expected = load(lzma.decompress((goldens / "mergekit" / golden["tensor_file"]).read_bytes()))
    base = load_file(tmp_path / "llama_a_fp32" / "model.safetensors")
    other = load_file(tmp_path / "llama_b_fp32" / "model.safetensors")
    assert set(expected) == set(base)
    for tensor, value in expected.items():
        torch.testing.assert_close(nearswap(base[tensor], [other[tensor]], t=0.01), value, rtol=2e-7, atol=1e-8)
