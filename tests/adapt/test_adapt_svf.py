"""SVD cache, fingerprint, apply/restore and the differentiable re-composition."""

from __future__ import annotations

import pytest
import torch

from shoal.adapt import SVFAdapter, load_or_compute_svd, model_fingerprint, recompose, select_matrices
from shoal.adapt.svd_cache import compute_svd
from shoal.errors import ConfigError

from adapt_toys import load


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 14, 3, 22, 7], [1, 8, 8, 2, 30, 11, 4]])


def test_default_matrices_are_the_mlp_ones(llama, tiny_model_dir):
    names = select_matrices(llama)
    mlp = ("gate_proj", "up_proj", "down_proj")
    assert names == [f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in mlp]
    gpt2 = load(tiny_model_dir("adapt-gpt2", "gpt2"))
    assert select_matrices(gpt2) == [f"transformer.h.{i}.mlp.{m}.weight" for i in range(2) for m in ("c_fc", "c_proj")]
    queries = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    assert select_matrices(llama, [r"self_attn\.q_proj"]) == queries


def test_identity_z_reproduces_logits(tiny_model_dir, svd_dir):
    for arch in ("llama", "gpt2", "qwen2"):
        model = load(tiny_model_dir(f"adapt-{arch}", arch))
        with torch.no_grad():
            base = model(input_ids=_ids()).logits
        factors = load_or_compute_svd(model, cache_dir=svd_dir)
        adapter = SVFAdapter(model, factors)
        adapter.apply(factors.ones())
        with torch.no_grad():
            adapted = model(input_ids=_ids()).logits
        recomposed = [not torch.equal(adapter.params[n], adapter.originals[n]) for n in factors.names]
        assert any(recomposed)  # the weights really were rebuilt from U, S, Vh
        torch.testing.assert_close(adapted, base, atol=1e-5, rtol=1e-4)


def expected_weight(weight: torch.Tensor, z: torch.Tensor, parametrization: str) -> torch.Tensor:
    """Independent float64 reference: U diag(S z) Vh, times sum(S) / sum(S z) for ``reference``
    (SakanaAI/self-adaptive-llms utils.compose_new_params, with torch.svd's V)."""
    u, s, v = torch.svd(weight.double())
    out = u @ torch.diag(s * z.double()) @ v.T
    return out * (s.sum() / (s * z.double()).sum()) if parametrization == "reference" else out


@pytest.mark.parametrize("parametrization", ["reference", "direct"])
def test_apply_matches_reference_and_restore_is_bitwise(llama, svd_dir, parametrization):
    original = {k: v.clone() for k, v in llama.state_dict().items()}
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    adapter = SVFAdapter(llama, factors, parametrization=parametrization)
    gen = torch.Generator().manual_seed(0)
    z = {n: torch.rand(factors.rank(n), generator=gen) for n in factors.names}
    adapter.apply(z)
    for n in factors.names:
        expected = expected_weight(original[n], z[n], parametrization)
        torch.testing.assert_close(llama.state_dict()[n].double(), expected, atol=1e-5, rtol=1e-5)
    adapter.restore()
    for k, v in llama.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_reference_z_one_gives_w_and_the_rescale_keeps_the_singular_value_sum(llama, svd_dir):
    original = {k: v.clone() for k, v in llama.state_dict().items()}
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    adapter = SVFAdapter(llama, factors)  # the reference parametrization is the default
    assert adapter.parametrization == "reference"
    adapter.apply(factors.ones())
    for n in factors.names:  # z = 1: W back within float32 rounding
        torch.testing.assert_close(adapter.params[n], original[n], atol=2e-6, rtol=1e-5)
    # any constant z is the base too (the reference starts near sigmoid(0.1) = 0.525)
    adapter.apply({n: torch.full((factors.rank(n),), 0.525) for n in factors.names})
    for n in factors.names:
        torch.testing.assert_close(adapter.params[n], original[n], atol=2e-6, rtol=1e-5)
    gen = torch.Generator().manual_seed(3)
    z = {n: torch.rand(factors.rank(n), generator=gen) for n in factors.names}
    adapter.apply(z)
    for n in factors.names:
        before = torch.linalg.svdvals(original[n].double())
        after = torch.linalg.svdvals(adapter.params[n].double())
        assert not torch.allclose(after, before, atol=1e-3)  # the spectrum changed ...
        torch.testing.assert_close(after.sum(), before.sum(), atol=1e-5, rtol=1e-5)  # ... its sum did not
    adapter.restore()


def test_recompose_with_an_all_zero_z_is_zero_not_nan():
    U, S, Vh = torch.linalg.svd(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), full_matrices=False)
    assert torch.equal(recompose(U, S, Vh, torch.zeros(4), rescale=True), torch.zeros(5, 4))
    with pytest.raises(ConfigError, match="parametrization"):
        SVFAdapter(torch.nn.Linear(2, 2), None, parametrization="sigmoid")  # type: ignore[arg-type]


def test_restore_is_bitwise_in_bfloat16(tiny_model_dir, svd_dir):
    model = load(tiny_model_dir("adapt-llama", "llama", seed=1), torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    factors = load_or_compute_svd(model, cache_dir=svd_dir)
    adapter = SVFAdapter(model, factors, parametrization="direct")
    with adapter.applied({n: torch.full((factors.rank(n),), 1.3) for n in factors.names}):
        assert all(model.state_dict()[n].dtype == torch.bfloat16 for n in factors.names)
        assert not torch.equal(model.state_dict()[factors.names[0]], original[factors.names[0]])
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_partial_expert_leaves_other_matrices_original(llama, svd_dir):
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    adapter = SVFAdapter(llama, factors, parametrization="direct")
    first, second = factors.names[0], factors.names[1]
    adapter.apply({n: torch.full((factors.rank(n),), 2.0) for n in factors.names})
    adapter.apply({first: torch.full((factors.rank(first),), 0.5)})  # switch: second must be original again
    assert torch.equal(adapter.params[second], adapter.originals[second])
    torch.testing.assert_close(adapter.params[first], 0.5 * adapter.originals[first], atol=1e-5, rtol=1e-4)
    adapter.restore()


def test_functional_forward_matches_in_place_and_has_gradients(llama, svd_dir):
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    adapter = SVFAdapter(llama, factors)
    gen = torch.Generator().manual_seed(1)
    z = {n: torch.rand(factors.rank(n), generator=gen).requires_grad_() for n in factors.names}
    logits = adapter.forward(z, input_ids=_ids()).logits
    assert all(torch.equal(adapter.params[n], adapter.originals[n]) for n in factors.names)  # untouched
    with adapter.applied({n: v.detach() for n, v in z.items()}), torch.no_grad():
        reference = llama(input_ids=_ids()).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)
    logits.square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in z.values())


def test_svd_cache_is_reused_and_keyed_by_fingerprint(tiny_model_dir, svd_dir, monkeypatch):
    model = load(tiny_model_dir("adapt-llama", "llama", seed=1))
    first = load_or_compute_svd(model, cache_dir=svd_dir)
    assert (svd_dir / f"{first.fingerprint}.safetensors").exists()
    import shoal.adapt.svd_cache as svd_cache

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(svd_cache, "compute_svd", refuse)
    again = load_or_compute_svd(model, cache_dir=svd_dir)
    for n in first.names:
        assert torch.equal(again.U[n], first.U[n]) and torch.equal(again.S[n], first.S[n])
    monkeypatch.undo()
    base = tiny_model_dir("adapt-llama", "llama", seed=1)
    other = load(tiny_model_dir("adapt-llama-ft", "llama", seed=2, base=base))
    assert model_fingerprint(other, first.names) != first.fingerprint
    assert load_or_compute_svd(other, cache_dir=svd_dir).fingerprint != first.fingerprint


def test_fingerprint_sees_a_small_change(llama):
    names = select_matrices(llama)
    before = model_fingerprint(llama, names)
    with torch.no_grad():
        llama.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # element 0 is always in the sample
    assert model_fingerprint(llama, names) != before
    assert compute_svd(llama, names).fingerprint == model_fingerprint(llama, names)
