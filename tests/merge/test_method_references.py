"""Every merge method against an independent reference written here with loops and sorting.

Inputs are float64 so the method (which then computes in float64) and the plain-Python
references agree to rounding. Random methods are checked by regenerating their masks: one
``torch.rand(shape)`` draw per model, in model order, from a generator with the same seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from shoal.merge.methods import top_k_mask
from shoal.merge.registry import get_method

F64 = dict(rtol=1e-12, atol=1e-12)


def rand_inputs(count: int, shape=(4, 6), seed: int = 0, scale: float = 0.3):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


def flat(t: torch.Tensor) -> list[float]:
    return t.flatten().tolist()


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def f32(x: float) -> float:
    """``x`` rounded to float32, as the methods compare draws with probabilities in float32."""
    return torch.tensor(x, dtype=torch.float32).item()


# --- reference pieces ----------------------------------------------------------------------

def ref_count(fraction: float, n: int, floor: bool) -> int:
    return math.floor(fraction * n) if floor else math.floor(fraction * n + 0.5)


def ref_by_magnitude(values: list[float]) -> list[int]:
    """Indices from largest to smallest magnitude; equal magnitudes by index."""
    return sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))


def ref_trim(values: list[float], density: float, floor: bool = False) -> list[float]:
    if density >= 1:
        return list(values)
    keep = set(ref_by_magnitude(values)[:ref_count(density, len(values), floor)])
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def ref_band(values: list[float], density: float, gamma: float, floor: bool = False) -> list[float]:
    if density >= 1:
        return list(values)
    n = len(values)
    n_keep = ref_count(density, n, floor)
    n_top = min(ref_count(gamma, n, floor), n - n_keep)
    keep = set(ref_by_magnitude(values)[n_top:n_top + n_keep])
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def ref_consensus(deltas: list[list[float]], weights: list[float], normalize: bool,
                  mergekit: bool = False) -> list[float]:
    out = []
    for i in range(len(deltas[0])):
        if mergekit:
            elected = 1 if sum(w * d[i] for w, d in zip(weights, deltas)) >= 0 else -1
        else:
            elected = sign(sum(d[i] for d in deltas))
        agree = [k for k, d in enumerate(deltas) if d[i] != 0 and sign(d[i]) == elected]
        numerator = sum(weights[k] * deltas[k][i] for k in agree)
        denominator = sum(weights[k] for k in agree)
        out.append(numerator / denominator if normalize and denominator != 0 else numerator)
    return out


def ref_sum(deltas: list[list[float]], weights: list[float], normalize: bool) -> list[float]:
    out = [sum(w * d[i] for w, d in zip(weights, deltas)) for i in range(len(deltas[0]))]
    total = sum(weights)
    return [x / total for x in out] if normalize and abs(total) >= 1e-8 else out


def ref_result(base: torch.Tensor, merged: list[float], lam: float) -> torch.Tensor:
    values = [b + lam * m for b, m in zip(flat(base), merged)]
    return torch.tensor(values, dtype=base.dtype).reshape(base.shape)


def deltas_of(base: torch.Tensor, models: list[torch.Tensor]) -> list[list[float]]:
    return [[m - b for m, b in zip(flat(model), flat(base))] for model in models]


def ref_l1_rescale(dense: list[float], sparse: list[float]) -> list[float]:
    before, after = sum(abs(x) for x in dense), sum(abs(x) for x in sparse)
    return sparse if before < 1e-7 or after < 1e-7 else [x * before / after for x in sparse]


def ref_dare_drop(deltas, densities, shape, seed,  # type: ignore[no-untyped-def]
                  rescale=True, mergekit=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for d, p in zip(deltas, densities):
        if p >= 1:
            out.append(list(d))
            continue
        u = flat(torch.rand(shape, generator=g))
        kept = [x if ui < f32(p) else 0.0 for x, ui in zip(d, u)]
        if rescale:
            kept = ref_l1_rescale(d, kept) if mergekit else [x / p for x in kept]
        out.append(kept)
    return out


def ref_della_drop(deltas, densities, epsilons, shape, seed,  # type: ignore[no-untyped-def]
                   rescale=True, mergekit=False):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    out = []
    for d, p, eps in zip(deltas, densities, epsilons):
        u = flat(torch.rand(shape, generator=g))
        kept = [0.0] * len(d)
        for r in range(rows):
            row = list(range(r * cols, (r + 1) * cols))
            ascending = sorted(row, key=lambda i: (abs(d[i]), i))
            for rank, i in enumerate(ascending):
                prob = f32(min(1.0, max(0.0, p - eps + 2 * eps * rank / (cols - 1))))
                if u[i] < prob:
                    kept[i] = d[i] / prob if rescale and not mergekit else d[i]
        out.append(ref_l1_rescale(d, kept) if rescale and mergekit else kept)
    return out


# --- selection -----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 5, 13, 29, 30])
def test_top_k_mask_matches_sorting_with_ties_by_index(k: int) -> None:
    scores = torch.randint(0, 6, (5, 6), generator=torch.Generator().manual_seed(k)).double()
    expected = set(sorted(range(30), key=lambda i: (-flat(scores)[i], i))[:k])
    got = top_k_mask(scores, k)
    assert got.shape == scores.shape and int(got.sum()) == k
    assert {i for i, keep in enumerate(flat(got)) if keep} == expected


# --- deterministic methods -----------------------------------------------------------------

def test_linear() -> None:
    _, models = rand_inputs(3)
    w = [0.2, 0.5, -0.1]
    xs = [flat(m) for m in models]
    weighted = [sum(wk * x[i] for wk, x in zip(w, xs)) for i in range(len(xs[0]))]
    linear = get_method("linear").fn
    got = linear(None, models, weight=w, normalize=True)
    torch.testing.assert_close(flat(got), [v / sum(w) for v in weighted], **F64)
    torch.testing.assert_close(flat(linear(None, models, weight=w, normalize=False)), weighted, **F64)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize: bool) -> None:
    base, models = rand_inputs(2)
    w, lam = [0.7, -0.3], 1.3
    expected = ref_result(base, ref_sum(deltas_of(base, models), w, normalize), lam)
    got = get_method("task_arithmetic").fn(base, models, weight=w, lambda_=lam, normalize=normalize)
    torch.testing.assert_close(got, expected, **F64)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_paper(normalize: bool) -> None:
    base, models = rand_inputs(3)
    w, dens, lam = [0.5, 1.0, 0.8], [0.5, 0.3, 0.7], 1.2
    trimmed = [ref_trim(d, p) for d, p in zip(deltas_of(base, models), dens)]
    expected = ref_result(base, ref_consensus(trimmed, w, normalize), lam)
    got = get_method("ties").fn(base, models, weight=w, density=dens, lambda_=lam, normalize=normalize)
    torch.testing.assert_close(got, expected, **F64)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_mergekit(normalize: bool) -> None:
    base, models = rand_inputs(3, seed=4)
    w, dens = [0.2, 1.0, 0.6], [0.55, 0.3, 0.72]  # floor and nearest counts differ for 0.55 and 0.72
    trimmed = [ref_trim(d, p, floor=True) for d, p in zip(deltas_of(base, models), dens)]
    expected = ref_result(base, ref_consensus(trimmed, w, normalize, mergekit=True), 1.0)
    ties = get_method("ties").fn
    got = ties(base, models, weight=w, density=dens, normalize=normalize, compat="mergekit")
    torch.testing.assert_close(got, expected, **F64)
    assert not torch.allclose(got, ties(base, models, weight=w, density=dens, normalize=normalize))


def test_ties_sign_election_paper_versus_mergekit() -> None:
    # one coordinate: model a moves +1 with weight 0.1, model b moves -0.5 with weight 1
    base = torch.zeros(1, dtype=torch.float64)
    models = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([-0.5], dtype=torch.float64)]
    ties = get_method("ties").fn
    # paper: sgn(1 - 0.5) = +, only a agrees: (0.1 * 1) / 0.1
    assert ties(base, models, weight=[0.1, 1.0], density=1.0).item() == pytest.approx(1.0)
    # mergekit: sgn(0.1 - 0.5) = -, only b agrees: (1 * -0.5) / 1
    assert ties(base, models, weight=[0.1, 1.0], density=1.0, compat="mergekit").item() == pytest.approx(-0.5)
    # an exact tie: no sign wins in the paper, + wins in mergekit
    tied = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)]
    assert ties(base, tied, weight=1.0, density=1.0).item() == 0.0
    assert ties(base, tied, weight=1.0, density=1.0, compat="mergekit").item() == 1.0


def test_ties_keeps_exactly_k_with_ties_broken_by_index() -> None:
    base = torch.zeros(8, dtype=torch.float64)
    model = torch.tensor([1.0, -2.0, 1.0, 0.5, -1.0, 1.0, 0.25, -1.0], dtype=torch.float64)
    got = get_method("ties").fn(base, [model], weight=1.0, density=0.375)  # k = 3: -2, then 1.0 at 0 and 2
    assert flat(got) == [1.0, -2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # density * n = 2.5 rounds half up to 3 (nearest); mergekit floors to 2
    assert flat(get_method("ties").fn(base, [model], weight=1.0, density=0.3125)) == flat(got)
    got = get_method("ties").fn(base, [model], weight=1.0, density=0.3125, compat="mergekit")
    assert flat(got) == [1.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("compat", ["paper", "mergekit"])
@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(name: str, compat: str) -> None:
    base, models = rand_inputs(2, shape=(5, 7), seed=2)
    w, dens, gam, lam = [0.6, 0.9], [0.55, 0.9], [0.1, 0.2], 0.8  # density + gamma > 1 for model 1
    mergekit = compat == "mergekit"
    banded = [ref_band(d, p, g, floor=mergekit) for d, p, g in zip(deltas_of(base, models), dens, gam)]
    if name == "breadcrumbs":
        merged = ref_sum(banded, w, normalize=False)
    else:
        merged = ref_consensus(banded, w, normalize=not mergekit, mergekit=mergekit)
    got = get_method(name).fn(base, models, weight=w, density=dens, gamma=gam, lambda_=lam, compat=compat)
    torch.testing.assert_close(got, ref_result(base, merged, lam), **F64)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(filter_wise: bool) -> None:
    base, models = rand_inputs(3, shape=(3, 5), seed=6)
    # make the fine-tunes share a direction so that t is well inside (0, 1)
    shared = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    models = [m + shared for m in models]
    rows = [list(range(r * 5, (r + 1) * 5)) for r in range(3)] if filter_wise else [list(range(15))]
    b, ms = flat(base), [flat(m) for m in models]
    expected = [0.0] * 15
    for row in rows:
        offsets = [[m[i] - b[i] for i in row] for m in ms]
        cosines = []
        for i in range(3):
            for j in range(i + 1, 3):
                dot = sum(x * y for x, y in zip(offsets[i], offsets[j]))
                norms = math.sqrt(sum(x * x for x in offsets[i]) * sum(y * y for y in offsets[j]))
                cosines.append(dot / norms)
        cos = sum(cosines) / len(cosines)
        t = 3 * cos / (1 + 2 * cos)
        assert 0.2 < t < 1.0
        for i in row:
            expected[i] = t * sum(m[i] for m in ms) / 3 + (1 - t) * b[i]
    got = get_method("model_stock").fn(base, models, filter_wise=filter_wise)
    torch.testing.assert_close(flat(got), expected, **F64)


def test_model_stock_small_task_vectors_and_cancelling_ones() -> None:
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1e-4, 1e-4, 0, 0], dtype=torch.float64)
    b = torch.tensor([1e-4, 0, 1e-4, 0], dtype=torch.float64)
    model_stock = get_method("model_stock").fn
    # cos = 0.5 exactly, t = 2 * 0.5 / 1.5
    torch.testing.assert_close(model_stock(base, [a, b]), (2 / 3) * (a + b) / 2, **F64)
    # mergekit floors |a| |b| = 2e-8 at 1e-6: cos = 1e-8 / 1e-6 = 0.01, t = 0.02 / 1.01
    torch.testing.assert_close(model_stock(base, [a, b], compat="mergekit"), (0.02 / 1.01) * (a + b) / 2,
                               **F64)
    # opposite task vectors: cos = -1, 1 + cos = 0, t undefined: the base
    assert torch.equal(model_stock(base, [a, -a]), base)


def test_passthrough_scales_one_model() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    passthrough = get_method("passthrough").fn
    assert passthrough(None, [x]) is x
    torch.testing.assert_close(flat(passthrough(None, [x], scale=0.5)), [0.5 * v for v in flat(x)], **F64)


# --- random methods ------------------------------------------------------------------------

@pytest.mark.parametrize("compat", ["paper", "mergekit"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_dare(name: str, rescale: bool, compat: str) -> None:
    shape = (4, 6)
    base, models = rand_inputs(3, shape=shape, seed=1)
    w, dens, lam, seed = [0.5, 0.8, 1.0], [0.4, 1.0, 0.7], 1.1, 21  # density 1 draws nothing
    mergekit = compat == "mergekit"
    dropped = ref_dare_drop(deltas_of(base, models), dens, shape, seed, rescale=rescale, mergekit=mergekit)
    if name == "dare_ties":
        merged = ref_consensus(dropped, w, normalize=not mergekit, mergekit=mergekit)
    else:
        merged = ref_sum(dropped, w, normalize=False)
    got = get_method(name).fn(base, models, weight=w, density=dens, lambda_=lam, rescale=rescale,
                              generator=torch.Generator().manual_seed(seed), compat=compat)
    torch.testing.assert_close(got, ref_result(base, merged, lam), **F64)


@pytest.mark.parametrize("compat", ["paper", "mergekit"])
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della(name: str, compat: str) -> None:
    shape = (3, 8)
    base, models = rand_inputs(2, shape=shape, seed=8)
    w, dens, eps, lam, seed = [0.9, 0.6], [0.5, 0.3], [0.2, 0.4], 1.0, 5  # 0.3 - 0.4 < 0: clipped to 0
    mergekit = compat == "mergekit"
    dropped = ref_della_drop(deltas_of(base, models), dens, eps, shape, seed, mergekit=mergekit)
    if name == "della":
        merged = ref_consensus(dropped, w, normalize=True, mergekit=mergekit)
    else:
        merged = ref_sum(dropped, w, normalize=False)
    got = get_method(name).fn(base, models, weight=w, density=dens, epsilon=eps, lambda_=lam,
                              generator=torch.Generator().manual_seed(seed), compat=compat)
    torch.testing.assert_close(got, ref_result(base, merged, lam), rtol=1e-6, atol=1e-9)


def test_dare_keeps_about_density_and_preserves_the_mean() -> None:
    base = torch.zeros(200_000, dtype=torch.float64)
    model = torch.ones(200_000, dtype=torch.float64)
    got = get_method("dare_linear").fn(base, [model], density=0.3, generator=torch.Generator().manual_seed(0))
    kept = float((got != 0).double().mean())
    assert abs(kept - 0.3) < 0.005
    assert abs(float(got.mean()) - 1.0) < 0.02  # rescaling by 1/p keeps the expectation
