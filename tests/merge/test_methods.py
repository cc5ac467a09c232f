"""Invariants every registered merge method keeps, slerp's geometry, and the registry's checks."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.errors import MergeError, RecipeError
from shoal.merge.registry import all_methods, get_method, merge_method

METHODS = all_methods()
IDS = [m.name for m in METHODS]

# values the invariant tests use; per-model values are cut to the number of models
TEST_VALUES = {
    "weight": [0.7, 0.5, 0.9], "density": [0.6, 0.4, 0.5], "gamma": [0.1, 0.05, 0.0],
    "epsilon": [0.1, 0.2, 0.15], "t": 0.3, "lambda": 1.1, "scale": [1.0],
    "normalize": True, "rescale": True, "filter_wise": False,
    "nuslerp_flatten": False, "nuslerp_row_wise": True, "normalize_weights": True, "eps": 1e-8,
    "max_iter": 10, "tol": 1e-5, "select_topk": 0.7, "r": 0.1, "alpha": 0.2,
}
# a method's own parameter (registry ``own_params``) that means something else than the table's
OWN_TEST_VALUES = {("ram", "epsilon"): 1e-5, ("ramplus_tl", "epsilon"): 1e-5, ("nearswap", "t"): 0.05}


def model_count(spec) -> int:  # type: ignore[no-untyped-def]
    return spec.max_models if spec.max_models is not None and spec.max_models < 3 else 3


def kwargs_for(spec, n: int) -> dict:  # type: ignore[no-untyped-def]
    kwargs = {}
    for p in spec.params:
        value = OWN_TEST_VALUES.get((spec.name, p.name), TEST_VALUES[p.name])
        key = "lambda_" if p.name == "lambda" else p.name
        kwargs[key] = value[:n] if p.per_model else value
    return kwargs


def inputs_for(spec, dtype: torch.dtype = torch.float32, seed: int = 0,  # type: ignore[no-untyped-def]
               shape=(6, 10)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(model_count(spec))]
    return (base.to(dtype) if takes_base(spec) else None), [m.to(dtype) for m in models]


def takes_base(spec) -> bool:  # type: ignore[no-untyped-def]
    """Methods with an optional base run with one here (test_new_methods.py covers them without)."""
    return spec.needs_base or spec.optional_base


def call(spec, base, models, seed: int | None = 0, **overrides):  # type: ignore[no-untyped-def]
    kwargs = kwargs_for(spec, len(models)) | overrides
    if spec.uses_generator and seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return spec.fn(base, models, **kwargs)


def test_every_method_of_the_issue_is_registered() -> None:
    assert set(IDS) == {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                        "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock",
                        "passthrough",
                        # mergekit's other methods (issue #13)
                        "nearswap", "nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl",
                        "arcee_fusion"}
    for spec in METHODS:
        assert spec.summary and spec.paper.startswith("https://")
        assert spec.paper in (spec.fn.__doc__ or "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", METHODS, ids=IDS)
def test_shape_dtype_and_finite(spec, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    base, models = inputs_for(spec, dtype)
    out = call(spec, base, models)
    assert out.shape == models[0].shape
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", METHODS, ids=IDS)
def test_half_precision_is_computed_in_float32(spec) -> None:  # type: ignore[no-untyped-def]
    base, models = inputs_for(spec, torch.bfloat16)
    out = call(spec, base, models)
    wide = call(spec, None if base is None else base.float(), [m.float() for m in models])
    torch.testing.assert_close(out, wide.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("spec", METHODS, ids=IDS)
def test_identical_inputs_give_the_input_back(spec) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    models = [x.clone() for _ in range(model_count(spec))]
    out = call(spec, x.clone() if takes_base(spec) else None, models)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", METHODS, ids=IDS)
def test_inputs_are_not_modified(spec) -> None:  # type: ignore[no-untyped-def]
    base, models = inputs_for(spec)
    saved = (None if base is None else base.clone(), [m.clone() for m in models])
    call(spec, base, models)
    if base is not None:
        assert torch.equal(base, saved[0])
    assert all(torch.equal(m, s) for m, s in zip(models, saved[1]))


@pytest.mark.parametrize("spec", METHODS, ids=IDS)
def test_seed_determinism(spec) -> None:  # type: ignore[no-untyped-def]
    base, models = inputs_for(spec)
    first = call(spec, base, models, seed=11)
    assert torch.equal(first, call(spec, base, models, seed=11))
    if spec.uses_generator:
        assert not torch.equal(first, call(spec, base, models, seed=12))
        # no generator: a fixed default seed, never the global RNG
        torch.manual_seed(1)
        unseeded = call(spec, base, models, seed=None)
        torch.manual_seed(2)
        assert torch.equal(unseeded, call(spec, base, models, seed=None))


WITH_COMPAT = [m for m in METHODS if m.has_compat]


@pytest.mark.parametrize("spec", WITH_COMPAT, ids=[m.name for m in WITH_COMPAT])
def test_compat_modes_run_and_bad_compat_is_an_error(spec) -> None:  # type: ignore[no-untyped-def]
    base, models = inputs_for(spec)
    assert torch.isfinite(call(spec, base, models, compat="mergekit")).all()
    with pytest.raises(RecipeError, match="compat"):
        call(spec, base, models, compat="mergekitt")


# --- slerp geometry ------------------------------------------------------------------------

def test_slerp_endpoints_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    slerp = get_method("slerp").fn
    assert torch.equal(slerp(a, [b], t=0.0), a)
    assert torch.equal(slerp(a, [b], t=1.0), b)


def test_slerp_midpoint_of_orthogonal_vectors() -> None:
    slerp = get_method("slerp").fn
    got = slerp(torch.tensor([3.0, 0.0]), [torch.tensor([0.0, 1.0])], t=0.5)
    # omega = pi/2: sin(pi/4)/sin(pi/2) * a + sin(pi/4)/sin(pi/2) * b
    torch.testing.assert_close(got, torch.tensor([3 / math.sqrt(2), 1 / math.sqrt(2)]))


def test_slerp_against_the_hand_formula() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = 0.3
    va, vb = a.flatten().tolist(), b.flatten().tolist()
    dot = sum(x * y for x, y in zip(va, vb))
    omega = math.acos(dot / math.sqrt(sum(x * x for x in va) * sum(y * y for y in vb)))
    expected = [(math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
                for x, y in zip(va, vb)]
    got = get_method("slerp").fn(a, [b], t=t)
    torch.testing.assert_close(got.flatten(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_slerp_falls_back_to_linear_for_colinear_and_zero_vectors() -> None:
    slerp = get_method("slerp").fn
    a = torch.tensor([1.0, 2.0, -1.0])
    torch.testing.assert_close(slerp(a, [2.5 * a], t=0.4), 0.6 * a + 0.4 * 2.5 * a)
    torch.testing.assert_close(slerp(a, [-a], t=0.25), 0.75 * a - 0.25 * a)
    zero = torch.zeros(3)
    torch.testing.assert_close(slerp(zero, [a], t=0.3), 0.3 * a)


# --- input checks --------------------------------------------------------------------------

def test_shape_mismatch_is_a_merge_error() -> None:
    with pytest.raises(MergeError, match=r"shape mismatch.*\[2, 3\].*\[3, 2\]"):
        get_method("ties").fn(torch.zeros(2, 3), [torch.zeros(3, 2)], weight=1.0, density=0.5)


def test_model_count_is_checked() -> None:
    x = torch.zeros(3)
    with pytest.raises(MergeError, match="exactly 1"):
        get_method("slerp").fn(x, [x, x], t=0.5)
    with pytest.raises(MergeError, match="at least 2"):
        get_method("model_stock").fn(x, [x])
    with pytest.raises(MergeError, match="needs a base"):
        get_method("task_arithmetic").fn(None, [x])


def test_parameter_values_are_checked() -> None:
    x = torch.zeros(4)
    with pytest.raises(RecipeError, match="'density' must lie in"):
        get_method("ties").fn(x, [x], weight=1.0, density=1.5)
    with pytest.raises(RecipeError, match="'weight' has 1 values for 2 models"):
        get_method("ties").fn(x, [x, x], weight=[1.0], density=0.5)
    with pytest.raises(RecipeError, match="sum to 0"):
        get_method("linear").fn(None, [x, x], weight=[1.0, -1.0])


# --- registry ------------------------------------------------------------------------------

def test_registry_rejects_a_duplicate_name() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        @merge_method("ties", needs_base=True, paper="https://example.org")
        def again(base, models, *, weight):  # type: ignore[no-untyped-def]
            return base
    assert get_method("ties").fn.__name__ == "ties"


def test_registry_rejects_an_unknown_parameter() -> None:
    with pytest.raises(ValueError, match="'temperature' is not in PARAMETERS"):
        @merge_method("test_only_unknown_param", needs_base=False, paper="https://example.org")
        def odd(base, models, *, temperature=1.0):  # type: ignore[no-untyped-def]
            return models[0]
    with pytest.raises(RecipeError):
        get_method("test_only_unknown_param")


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(RecipeError, match="unknown merge method 'nope'") as info:
        get_method("nope")
    for name in IDS:
        assert name in str(info.value)
