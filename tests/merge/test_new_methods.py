"""New merge methods against independent references written here, entry by entry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shoal.errors import MergeError, RecipeError
from shoal.merge.methods.nearswap import nearswap
from shoal.merge.methods.nuslerp import nuslerp


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
    with pytest.raises(RecipeError, match="needs parameter 't'"):  # no default, as in mergekit
        nearswap(torch.zeros(2), [torch.ones(2)])


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


# --- nuslerp ---------------------------------------------------------------------------------

def _slerp_pair_reference(x: list[float], y: list[float], t: float) -> list[float]:
    """SLERP of two plain lists, written from the formula (mergekit's norms floor and colinear rule)."""
    nx = max(math.sqrt(sum(v * v for v in x)), 1e-7)
    ny = max(math.sqrt(sum(v * v for v in y)), 1e-7)
    cos = max(-1.0, min(1.0, sum(a * b for a, b in zip(x, y)) / (nx * ny)))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * a + t * b for a, b in zip(x, y)]
    theta = math.acos(cos)
    return [(math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta) for a, b in zip(x, y)]


def _nuslerp_reference(base, a, b, w0: float, w1: float, flatten: bool, row_wise: bool):  # type: ignore[no-untyped-def]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    x = np.array(a, dtype=np.float64) - (0 if base is None else np.array(base, dtype=np.float64))
    y = np.array(b, dtype=np.float64) - (0 if base is None else np.array(base, dtype=np.float64))
    out = np.zeros_like(x)
    if flatten or x.ndim == 1:
        out = np.array(_slerp_pair_reference(x.ravel().tolist(), y.ravel().tolist(), t)).reshape(x.shape)
    elif row_wise:  # vectors along dim 0: one per column
        for j in range(x.shape[1]):
            out[:, j] = _slerp_pair_reference(x[:, j].tolist(), y[:, j].tolist(), t)
    else:
        for i in range(x.shape[0]):
            out[i] = _slerp_pair_reference(x[i].tolist(), y[i].tolist(), t)
    return out + (0 if base is None else np.array(base, dtype=np.float64))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, 3.0), (-0.5, 0.5)])
def test_nuslerp_matches_the_formula_vector_by_vector(with_base: bool, flatten: bool, row_wise: bool,
                                                      weights: tuple[float, float]) -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    a = base + 0.3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    b = base + 0.3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    b[1] = 2.0 * (a[1] - base[1]) + base[1]  # a colinear row of task vectors
    got = nuslerp(base if with_base else None, [a, b], weight=list(weights), nuslerp_flatten=flatten,
                  nuslerp_row_wise=row_wise)
    expected = _nuslerp_reference(base.numpy() if with_base else None, a.numpy(), b.numpy(), *weights,
                                  flatten, row_wise)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-10, atol=1e-12)


def test_nuslerp_of_a_vector_ignores_row_wise_and_keeps_the_endpoints() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(9, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    for row_wise in (False, True):
        torch.testing.assert_close(nuslerp(None, [a, b], weight=[1.0, 0.0], nuslerp_flatten=False,
                                           nuslerp_row_wise=row_wise), a)
        torch.testing.assert_close(nuslerp(None, [a, b], weight=[0.0, 2.0], nuslerp_flatten=False,
                                           nuslerp_row_wise=row_wise), b)


def test_nuslerp_takes_exactly_two_models() -> None:
    x = torch.zeros(3)
    with pytest.raises(MergeError, match="exactly 2"):
        nuslerp(None, [x, x, x], weight=1.0)
