"""mergekit's other methods (issue #13) against independent references written here, entry by entry.

The last tests run each method function on the tiny checkpoints of mergekit 0.1.5's goldens
(``tests/goldens/mergekit``) and compare with mergekit's stored outputs, whatever the recipe
plumbing around them does (``test_mergekit_goldens.py`` runs the same recipes through the CLI).
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file

from shoal.errors import MergeError, RecipeError
from shoal.merge.methods.arcee_fusion import arcee_fusion
from shoal.merge.methods.karcher import karcher
from shoal.merge.methods.multislerp import multislerp
from shoal.merge.methods.nearswap import nearswap
from shoal.merge.methods.nuslerp import nuslerp
from shoal.merge.methods.ram import ram, ramplus_tl
from shoal.merge.methods.sce import sce


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


# --- multislerp ------------------------------------------------------------------------------

def _multislerp_reference(base, models, weights, normalize=True, eps=1e-8):  # type: ignore[no-untyped-def]
    """Goddard's recipe step by step in numpy float64: tangent plane at the weighted mean, exp map back."""
    xs = [np.array(m, dtype=np.float64).ravel() - (0 if base is None else np.array(base, dtype=np.float64).ravel())
          for m in models]
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = [math.sqrt(float(x @ x)) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wk * u for wk, u in zip(w, units))
    mean = mean / math.sqrt(float(mean @ mean))
    step = sum(wk * (u - float(u @ mean) * mean) for wk, u in zip(w, units))
    length = math.sqrt(float(step @ step)) + eps
    point = math.cos(length) * mean + math.sin(length) / length * step
    out = point * sum(wk * n for wk, n in zip(w, norms))
    if base is not None:
        out = out + np.array(base, dtype=np.float64).ravel()
    return out.reshape(np.shape(models[0]))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(("weights", "normalize"), [([0.5, 0.3, 0.2], True), ([1.0, 2.0, 1.0], True),
                                                    ([0.2, 0.2, 0.3], False)])
def test_multislerp_matches_the_formula(with_base: bool, weights: list[float], normalize: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    models = [base + 0.2 * torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    got = multislerp(base if with_base else None, models, weight=weights, normalize_weights=normalize)
    expected = _multislerp_reference(base.numpy() if with_base else None, [m.numpy() for m in models],
                                     weights, normalize)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-10, atol=1e-12)


def test_multislerp_of_two_orthogonal_unit_vectors_is_their_midpoint_on_the_circle() -> None:
    x, y = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = multislerp(None, [x, y], weight=[1.0, 1.0])
    # the tangent parts cancel: the normalized mean direction, at the mean norm 1
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2.0))


def test_multislerp_edge_cases() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(multislerp(None, [x], weight=[0.3]), x)  # one model: itself
    base = torch.tensor([0.5, 0.5, 0.5])
    assert torch.equal(multislerp(base, [base.clone(), base.clone(), base.clone()], weight=1.0), base)
    # antipodal task vectors with balancing weights: linear for two models, an error for three
    torch.testing.assert_close(multislerp(None, [x, -x], weight=[1.0, 1.0]), torch.zeros(3))
    with pytest.raises(MergeError, match="cancel out"):
        multislerp(None, [x, -x, x, -x], weight=1.0)
    with pytest.raises(RecipeError, match="sum to 0"):
        multislerp(None, [x, 2 * x], weight=[1.0, -1.0])


# --- karcher ---------------------------------------------------------------------------------

def _sphere_log(mu: np.ndarray, u: np.ndarray) -> np.ndarray:
    cos = float(np.clip(mu @ u, -1.0, 1.0))
    theta = math.acos(cos)
    return np.zeros_like(mu) if theta < 1e-12 else theta / math.sin(theta) * (u - cos * mu)


def test_karcher_of_two_points_is_the_geodesic_midpoint_at_the_mean_norm() -> None:
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    got = karcher(None, [a, b], max_iter=50, tol=1e-12)
    ua, ub = a.numpy().ravel() / np.linalg.norm(a.numpy()), b.numpy().ravel() / np.linalg.norm(b.numpy())
    midpoint = (ua + ub) / np.linalg.norm(ua + ub)
    scale = (np.linalg.norm(a.numpy()) + np.linalg.norm(b.numpy())) / 2
    torch.testing.assert_close(got, torch.from_numpy((scale * midpoint).reshape(3, 5)), rtol=1e-9, atol=1e-10)


def test_karcher_mean_zeroes_the_summed_log_map_and_counts_the_base_as_a_point() -> None:
    gen = torch.Generator().manual_seed(9)
    points = [torch.randn(16, generator=gen, dtype=torch.float64) + 1.0 for _ in range(4)]
    got = karcher(points[3], points[:3], max_iter=100, tol=1e-13)
    mu = got.numpy() / np.linalg.norm(got.numpy())
    units = [p.numpy() / np.linalg.norm(p.numpy()) for p in points]
    # the Riemannian centre of mass: the mean of the log maps at mu vanishes (first-order condition)
    assert np.linalg.norm(sum(_sphere_log(mu, u) for u in units)) < 1e-10
    assert abs(np.linalg.norm(got.numpy()) - np.mean([np.linalg.norm(p.numpy()) for p in points])) < 1e-12
    torch.testing.assert_close(got, karcher(None, points, max_iter=100, tol=1e-13))


def test_karcher_edge_cases() -> None:
    x = torch.tensor([3.0, 4.0])
    assert torch.equal(karcher(None, [x]), x)
    assert torch.equal(karcher(None, [torch.zeros(2), torch.zeros(2)]), torch.zeros(2))
    # zero iterations: the normalized Euclidean mean of the directions
    got = karcher(None, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])], max_iter=0)
    torch.testing.assert_close(got, 1.5 * torch.tensor([1.0, 1.0]) / math.sqrt(2.0))
    with pytest.raises(RecipeError, match="max_iter must be a whole number"):
        karcher(None, [x, x], max_iter=2.5)


# --- sce -------------------------------------------------------------------------------------

def _sce_reference(base: np.ndarray, models: list[np.ndarray], select_topk: float) -> np.ndarray:
    """FuseChat's three steps entry by entry (float64, distinct variances so the top-k is unambiguous)."""
    b = base.ravel().astype(np.float64)
    deltas = [m.ravel().astype(np.float64) - b for m in models]
    n, k_models = b.size, len(models)
    if select_topk < 1:
        variances = []
        for i in range(n):
            values = [d[i] for d in deltas]
            mean = sum(values) / k_models
            variances.append(sum((v - mean) ** 2 for v in values) / k_models)
        keep = int(sum(v != 0 for v in variances) * select_topk)
        chosen = set(sorted(range(n), key=lambda i: -variances[i])[:keep])
        deltas = [np.array([d[i] if i in chosen else 0.0 for i in range(n)]) for d in deltas]
    energy = [sum(x * x for x in d) / n for d in deltas]
    weights = [e / sum(energy) for e in energy] if sum(energy) >= 1e-6 else [1.0 / k_models] * k_models
    out = b.copy()
    for i in range(n):
        majority = 1.0 if sum(d[i] for d in deltas) >= 0 else -1.0
        num = den = 0.0
        for w, d in zip(weights, deltas):
            if np.sign(d[i]) == majority:
                num += w * d[i]
                den += w
        out[i] += num / max(den, 1e-6)
    return out.reshape(base.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.3, 0.0])
def test_sce_matches_the_three_steps_entry_by_entry(select_topk: float) -> None:
    gen = torch.Generator().manual_seed(10)
    base = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(6, 9, generator=gen, dtype=torch.float64) * (k + 1) for k in range(3)]
    got = sce(base, models, select_topk=select_topk)
    expected = _sce_reference(base.numpy(), [m.numpy() for m in models], select_topk)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-10, atol=1e-12)


def test_sce_edge_cases() -> None:
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(12, generator=gen)
    model = base + torch.randn(12, generator=gen)
    torch.testing.assert_close(sce(base, [model]), model)  # one model, nothing selected away: itself
    assert torch.equal(sce(base, [model], select_topk=0.5), base)  # one model has no variance: nothing kept
    with pytest.raises(RecipeError, match="select_topk must lie in"):
        sce(base, [model], select_topk=1.5)


# --- ram, ramplus_tl -------------------------------------------------------------------------

def _ram_reference(base: np.ndarray, models: list[np.ndarray], epsilon: float, plus: tuple[float, float] | None
                   ) -> np.ndarray:
    """RAM entry by entry; with ``plus=(r, alpha)`` RAM+'s per-model scaling of unique changes."""
    b = base.ravel().astype(np.float64)
    deltas = [m.ravel().astype(np.float64) - b for m in models]
    changed = [[abs(x) > epsilon for x in d] for d in deltas]
    counts = [sum(c[i] for c in changed) for i in range(b.size)]
    scales = [1.0] * len(models)
    if plus is not None:
        r, alpha = plus
        for k, c in enumerate(changed):
            shared = sum(1 for i in range(b.size) if c[i] and counts[i] > 1)
            unique = sum(1 for i in range(b.size) if c[i] and counts[i] == 1)
            scales[k] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = b.copy()
    for i in range(b.size):
        for k, d in enumerate(deltas):
            if changed[k][i]:
                out[i] += d[i] * scales[k] if counts[i] == 1 else d[i] / counts[i]
    return out.reshape(base.shape)


def _sparse_task_vectors(seed: int, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes that each change a random ~half of the entries (overlapping and unique ones)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    models = []
    for _ in range(count):
        touched = torch.rand(7, 11, generator=gen, dtype=torch.float64) < 0.5
        models.append(base + touched * 0.1 * torch.randn(7, 11, generator=gen, dtype=torch.float64))
    return base, models


@pytest.mark.parametrize("count", [1, 2, 3])
def test_ram_averages_each_entry_over_the_models_that_changed_it(count: int) -> None:
    base, models = _sparse_task_vectors(12, count)
    expected = _ram_reference(base.numpy(), [m.numpy() for m in models], 1e-5, None)
    torch.testing.assert_close(ram(base, models), torch.from_numpy(expected), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("r", "alpha"), [(0.1, 0.2), (0.05, 1.0), (0.5, 3.0)])
def test_ramplus_tl_scales_unique_changes_by_the_shared_ratio(r: float, alpha: float) -> None:
    base, models = _sparse_task_vectors(13, 3)
    models[2] = base + (models[0] - base) * 0.5  # a model that shares most of its changes
    expected = _ram_reference(base.numpy(), [m.numpy() for m in models], 1e-5, (r, alpha))
    got = ramplus_tl(base, models, r=r, alpha=alpha)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-12, atol=1e-14)
    assert not torch.equal(got, ram(base, models))


def test_ram_threshold_and_refusals() -> None:
    base = torch.zeros(4, dtype=torch.float64)
    model = torch.tensor([1e-6, 1e-4, -1e-6, 0.5], dtype=torch.float64)
    torch.testing.assert_close(ram(base, [model, model]), torch.tensor([0.0, 1e-4, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(ram(base, [model], epsilon=1e-3),
                               torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float64))
    with pytest.raises(RecipeError, match="epsilon must be >= 0"):
        ram(base, [model], epsilon=-1.0)
    with pytest.raises(RecipeError, match="alpha must be >= 0"):
        ramplus_tl(base, [model], alpha=-0.5)


# --- arcee_fusion ----------------------------------------------------------------------------

def _arcee_fusion_reference(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Row by row in float64: softmax KL times the change, Tukey-style fence from the median."""
    b2, o2 = base.reshape(-1, base.shape[-1]).astype(np.float64), other.reshape(-1, base.shape[-1]).astype(np.float64)
    importance = []
    for row_b, row_o in zip(b2, o2):
        p = [math.exp(v) / sum(math.exp(w) for w in row_o) + 1e-8 for v in row_o]
        q = [math.exp(v) / sum(math.exp(w) for w in row_b) + 1e-8 for v in row_b]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        importance.append([abs(x - y) * kl for x, y in zip(row_o, row_b)])
    flat = sorted(v for row in importance for v in row)
    last = len(flat) - 1
    q1, median, q3 = flat[int(0.25 * last)], flat[int(0.5 * last)], flat[int(0.75 * last)]
    fence = median + 1.5 * (q3 - q1)
    out = [[o if imp >= fence else b for o, b, imp in zip(ro, rb, ri)] for ro, rb, ri in zip(o2, b2, importance)]
    return np.array(out).reshape(base.shape)


@pytest.mark.parametrize("shape", [(9, 13), (40,), (3, 4, 6)])
def test_arcee_fusion_keeps_the_outlying_changes(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(14)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    other = base + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64) ** 3  # heavy-tailed changes
    got = arcee_fusion(base, [other])
    expected = torch.from_numpy(_arcee_fusion_reference(base.numpy(), other.numpy()))
    assert torch.equal(got, expected)
    kept = got == other
    assert 0 < int(kept.sum()) < kept.numel() // 2  # some changes taken, most entries the base's


def test_arcee_fusion_compat_computes_in_the_inputs_dtype() -> None:
    gen = torch.Generator().manual_seed(15)
    base = torch.randn(16, 16, generator=gen)
    other = base + 0.05 * torch.randn(16, 16, generator=gen) ** 3
    # float32 inputs: both modes the same mask
    torch.testing.assert_close(arcee_fusion(base, [other], compat="mergekit"), arcee_fusion(base, [other]))
    with pytest.raises(RecipeError, match="compat"):
        arcee_fusion(base, [other], compat="exact")


# --- every method on mergekit 0.1.5's goldens -------------------------------------------------

GOLDENS = Path(__file__).resolve().parents[1] / "goldens"


@pytest.fixture(scope="module")
def golden_models(tmp_path_factory):  # type: ignore[no-untyped-def]
    """name -> tensors of the goldens' tiny checkpoints, rebuilt and checked against their recorded digests."""
    name = "shoal_golden_tiny_checkpoints"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GOLDENS / "tiny_checkpoints.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    builder = sys.modules[name]
    recorded = json.loads((GOLDENS / "mergekit" / "checkpoints.json").read_text())["digests"]
    root = tmp_path_factory.mktemp("new_methods_ckpt")
    wanted = ["llama_a", "llama_b", "llama_c", "llama_base", "llama_a_fp32", "llama_b_fp32"]
    models = {}
    for ckpt in wanted:
        assert builder.build_checkpoint(ckpt, root / ckpt) == recorded[ckpt]
        models[ckpt] = load_file(root / ckpt / "model.safetensors")
    return models


def _sce_selection_disagrees(models: dict, name: str, share: float) -> torch.Tensor:  # type: ignore[type-arg]
    """Entries the top-variance selection keeps with bf16 variances (mergekit's) but not float32 ones, or back."""
    chosen = []
    for dtype in (torch.bfloat16, torch.float32):
        deltas = torch.stack([models[m][name].to(dtype) - models["llama_c"][name].to(dtype)
                              for m in ("llama_a", "llama_b")])
        variance = deltas.var(dim=0, unbiased=False)
        flat = variance.abs().reshape(-1)
        mask = torch.zeros(flat.shape, dtype=torch.bool)
        mask[torch.topk(flat, int(int(torch.count_nonzero(flat)) * share)).indices] = True
        chosen.append(mask.reshape(variance.shape))
    return chosen[0] != chosen[1]


# case -> (function, base, models, keyword arguments, compute dtype (the recipe's), how compared)
GOLDEN_CALLS = {
    "f_nearswap_fp32": (nearswap, "llama_a_fp32", ["llama_b_fp32"], {"t": 0.01}, torch.float32, "round"),
    "t_nearswap": (nearswap, "llama_a", ["llama_b"], {"t": 0.0001}, torch.bfloat16, "round"),
    "t_nuslerp_zero_sum": (nuslerp, "llama_c", ["llama_a", "llama_b"],
                           {"weight": [-0.5, 0.5], "nuslerp_flatten": False}, torch.bfloat16, "round"),
    "t_multislerp": (multislerp, "llama_c", ["llama_a", "llama_b"], {"weight": [0.6, 0.4]}, torch.bfloat16, "round"),
    "f_multislerp_no_base": (multislerp, None, ["llama_a", "llama_b", "llama_c"], {"weight": [0.5, 0.3, 0.2]},
                             torch.float32, "round"),
    "t_karcher": (karcher, "llama_c", ["llama_a", "llama_b"], {"max_iter": 5, "tol": 1e-5}, torch.bfloat16, "round"),
    "f_karcher_three": (karcher, None, ["llama_a", "llama_b", "llama_c"], {}, torch.float32, "round"),
    "t_sce": (sce, "llama_c", ["llama_a", "llama_b"], {"select_topk": 0.5}, torch.bfloat16, "sce_cutoff"),
    "f_sce_three": (sce, "llama_base", ["llama_a", "llama_b", "llama_c"], {"select_topk": 0.7}, torch.float32, "round"),
    "t_ram": (ram, "llama_c", ["llama_a", "llama_b"], {}, torch.bfloat16, "round"),
    # mergekit 0.1.5 writes these two in float32 under dtype: bfloat16: compared after rounding to bf16
    "t_ramplus_tl": (ramplus_tl, "llama_c", ["llama_a", "llama_b"], {"r": 0.05, "alpha": 1.0}, torch.bfloat16,
                     "round"),
    "ex_arcee_fusion": (arcee_fusion, "llama_a", ["llama_b"], {"compat": "mergekit"}, torch.bfloat16, "bitwise"),
    "t_arcee_fusion": (arcee_fusion, "llama_a", ["llama_b"], {"compat": "mergekit"}, torch.bfloat16, "bitwise"),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CALLS))
def test_method_gives_mergekits_golden(case: str, golden_models) -> None:  # type: ignore[no-untyped-def]
    fn, base_name, model_names, kwargs, dtype, how = GOLDEN_CALLS[case]
    golden = json.loads((GOLDENS / "mergekit" / f"{case}.json").read_text())
    expected = load(lzma.decompress((GOLDENS / "mergekit" / golden["tensor_file"]).read_bytes()))
    assert set(expected) == set(golden_models["llama_a"])
    eps = torch.finfo(dtype).eps
    for name, value in expected.items():
        base = None if base_name is None else golden_models[base_name][name].to(dtype)
        got = fn(base, [golden_models[m][name].to(dtype) for m in model_names], **kwargs)
        assert got.dtype == dtype
        wanted = value.to(dtype).double()
        if how == "bitwise":
            assert torch.equal(got.double(), wanted), name
            continue
        beyond = (got.double() - wanted).abs() > 2 * eps * wanted.abs() + eps * float(wanted.abs().max())
        if how == "sce_cutoff":  # which entries straddle the top-k cut depends on the variance's precision
            disagree = _sce_selection_disagrees(golden_models, name, kwargs["select_topk"])
            assert int(disagree.sum()) <= max(2, disagree.numel() // 50), name
            beyond &= ~disagree
        assert not bool(beyond.any()), f"{name}: {int(beyond.sum())} entries beyond rounding"


# --- through the registry, the planner, the executor and the CLI --------------------------------

NEW_METHODS = ["nearswap", "nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl", "arcee_fusion"]


def test_shoal_methods_lists_every_new_method_with_its_parameters() -> None:
    from click.testing import CliRunner

    from shoal.cli.main import cli

    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0, result.output
    for name in NEW_METHODS:
        assert f"\n{name}  (" in "\n" + result.output
    for line in ("nuslerp  (optional base_model;", "karcher  (optional base_model;", "sce  (needs base_model;"):
        assert line in result.output
    for param in ("nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps", "max_iter", "tol",
                  "select_topk", "epsilon", " r ", "alpha"):
        assert param in result.output


def _write_trio(root: Path) -> list[Path]:
    """A base and two fine-tunes in bf16, big enough for several chunks; the fine-tunes change sparse entries."""
    from safetensors.torch import save_file

    shapes = {"model.embed_tokens.weight": (600, 256), "model.layers.0.self_attn.q_proj.weight": (64, 64),
              "model.norm.weight": (256,)}
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    folders = []
    for i, name in enumerate(("base", "a", "b")):
        tensors = {k: v + (i > 0) * (torch.rand(v.shape, generator=gen) < 0.6) * torch.randn(v.shape, generator=gen)
                   * 0.002 for k, v in base.items()}
        (root / name).mkdir()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
                  str(root / name / "model.safetensors"))
        folders.append(root / name)
    return folders


@pytest.mark.parametrize("method", NEW_METHODS)
def test_recipe_runs_and_chunks_are_bitwise_the_whole_tensor(method: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             monkeypatch) -> None:
    import yaml

    import shoal.merge.execute as execute
    from shoal.merge import merge
    from shoal.merge.execute import ExecutorOptions
    from shoal.merge.registry import get_method

    base, a, b = _write_trio(tmp_path)
    spec = get_method(method)
    models = [{"model": str(a), "parameters": {"weight": 0.6}}, {"model": str(b), "parameters": {"weight": 0.4}}]
    if spec.max_models == 1:
        models = models[:1]
    recipe: dict = {"merge_method": method, "base_model": str(base), "models": models}
    if "weight" not in {p.name for p in spec.params}:
        for entry in models:
            entry.pop("parameters")
    if method == "nearswap":
        recipe["parameters"] = {"t": 0.001}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    calls = {"whole": 0}
    real = execute.compute_op

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["whole"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "compute_op", counting)
    merge(path, tmp_path / "whole", options=ExecutorOptions(backend="reference"))
    calls["whole"] = 0
    merge(path, tmp_path / "fast", options=ExecutorOptions(chunk=1 << 16, fused_chunks=1))
    assert calls["whole"] == (0 if spec.chunked else 3)  # elementwise methods never run a whole tensor
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    fast = load_file(tmp_path / "fast" / "model.safetensors")
    originals = load_file(base / "model.safetensors")
    for name, tensor in whole.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor.view(torch.int16), fast[name].view(torch.int16))
        assert not torch.equal(tensor, originals[name])  # every method moved the base


def test_nearswap_recipe_without_t_is_refused_through_the_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from shoal.cli.main import cli

    base, a, _ = _write_trio(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {a}\n")
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "needs parameter 't'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
