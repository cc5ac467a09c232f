"""The expert file format: round trip, fingerprint refusal, transfer between same-shape bases."""

from __future__ import annotations

import json

import pytest
import torch
from adapt_toys import load
from safetensors import safe_open
from safetensors.torch import save_file

from shoal.adapt import ExpertError, load_expert, load_or_compute_svd, make_meta, save_expert
from shoal.errors import ShoalError


def _z(factors, value: float = 1.5):
    gen = torch.Generator().manual_seed(3)
    return {n: value + torch.randn(factors.rank(n), generator=gen) for n in factors.names}


def test_round_trip_keeps_vectors_and_metadata(llama, svd_dir, tmp_path):
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    z = _z(factors)
    meta = make_meta(factors, task="ay", objective="sft", steps=20, kl=0.1, lr=2e-3, scores={"validation": 0.75})
    path = save_expert(tmp_path / "e" / "ay.safetensors", z, meta)
    expert = load_expert(path, factors)
    assert expert.meta == meta and expert.name == "ay" and expert.path == path
    assert expert.num_parameters == factors.num_values == 2 * (32 + 32 + 32)
    for n in factors.names:
        assert torch.equal(expert.z[n], z[n])
    with safe_open(str(path), framework="pt") as f:  # the header is plain JSON anyone can read
        header = json.loads(f.metadata()["shoal.expert"])
    assert header["base_fingerprint"] == factors.fingerprint
    assert header["matrices"]["model.layers.0.mlp.down_proj.weight"] == [32, 64]
    assert header["task"] == "ay" and header["steps"] == 20 and header["kl"] == 0.1


def test_other_base_is_refused_unless_transfer(tiny_model_dir, llama, svd_dir, tmp_path):
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    path = save_expert(tmp_path / "ay.safetensors", _z(factors), make_meta(factors, task="ay"))
    other = load(tiny_model_dir("adapt-llama-seed7", "llama", seed=7))  # same shapes, other weights
    other_factors = load_or_compute_svd(other, cache_dir=svd_dir)
    with pytest.raises(ExpertError, match=r"ay\.safetensors.*transfer"):
        load_expert(path, other_factors)
    expert = load_expert(path, other_factors, transfer=True)
    assert expert.meta.base_fingerprint == factors.fingerprint


def test_other_shapes_are_refused_even_with_transfer(tiny_model_dir, llama, svd_dir, tmp_path):
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    path = save_expert(tmp_path / "ay.safetensors", _z(factors), make_meta(factors, task="ay"))
    one_layer = load(tiny_model_dir("adapt-llama-1layer", "llama", seed=1, num_layers=1))
    with pytest.raises(ExpertError, match="layers.1.mlp.*not adapted"):
        load_expert(path, load_or_compute_svd(one_layer, cache_dir=svd_dir), transfer=True)
    gpt2 = load(tiny_model_dir("adapt-gpt2", "gpt2"))
    with pytest.raises(ShoalError, match="ay.safetensors"):
        load_expert(path, load_or_compute_svd(gpt2, cache_dir=svd_dir), transfer=True)
    # same names, but the file claims another shape
    bad = make_meta(factors, task="ay").model_copy(update={"matrices": {n: (8, 8) for n in factors.names}})
    bad_path = save_expert(tmp_path / "bad.safetensors", _z(factors), bad)
    with pytest.raises(ExpertError, match=r"bad\.safetensors.*shape \(8, 8\)"):
        load_expert(bad_path, factors, transfer=True)


def test_files_that_are_not_experts(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    with pytest.raises(ExpertError, match="plain.safetensors.*not an SVF expert"):
        load_expert(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ExpertError, match="junk.safetensors"):
        load_expert(junk)
    with pytest.raises(ExpertError, match="missing.safetensors"):
        load_expert(tmp_path / "missing.safetensors")
