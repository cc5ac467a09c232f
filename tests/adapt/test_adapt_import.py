"""Reference (Sakana) expert files: imported through the library and ``shoal svf import``; old
(direct) shoal experts still load and apply as before."""

from __future__ import annotations

import json
import pytest
import torch
from adapt_toys import load
from click.testing import CliRunner
from torch import nn

from shoal.adapt import import_reference_expert, load_expert, load_or_compute_svd
from shoal.adapt.expert import METADATA_KEY, ExpertError
from shoal.adapt.two_pass import prepare
from shoal.cli.main import cli
from shoal.errors import ConfigError

MLP = ("gate_proj", "up_proj", "down_proj")


def reference_logits(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the reference's ``learnable_params.pt`` holds: bfloat16 logits per MLP weight, keyed
    by the Hugging Face name, one per singular value (``policy/base.py``)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (0.1 + torch.randn(min(w.shape), generator=gen)).to(torch.bfloat16)
            for name, w in model.state_dict().items() if "mlp" in name}


class ReferencePolicy(nn.Module):
    """The reference ``policy.Policy`` layout: a ParameterList named learnable_params_module_list."""

    def __init__(self, logits: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.learnable_params_module_list = nn.ParameterList([nn.Parameter(v) for v in logits.values()])


def reference_weight(weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """utils.compose_new_params in float64, with the mask as Policy.get_mask makes it."""
    u, s, v = torch.svd(weight.double())
    mask = torch.sigmoid(p).to(torch.bfloat16).double()
    return (u @ torch.diag(s * mask) @ v.T) * (s.sum() / (s * mask).sum())


@pytest.mark.parametrize("layout", ["learnable_params", "policy_params"])
def test_imported_expert_applies_the_reference_weights(llama, svd_dir, tmp_path, layout):
    logits = reference_logits(llama)
    ref_file = tmp_path / f"{layout}.pt"
    torch.save(logits if layout == "learnable_params" else ReferencePolicy(logits).state_dict(), ref_file)
    original = {k: v.clone() for k, v in llama.state_dict().items()}
    out = import_reference_expert(ref_file, llama, out=tmp_path / "imported.safetensors", base_model="tiny",
                                  task="gsm8k", cache_dir=svd_dir)
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    expert = load_expert(out, factors)  # the fingerprint and shapes fit this model
    assert expert.meta.parametrization == "reference" and expert.meta.task == "gsm8k"
    assert sorted(expert.z) == sorted(f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in MLP)
    assert expert.meta.base_fingerprint == factors.fingerprint and expert.meta.base_model == "tiny"
    adapter, _, _ = prepare(llama, [expert], cache_dir=svd_dir)
    assert adapter.parametrization == "reference"
    with adapter.applied(expert.z):
        for name, p in logits.items():
            torch.testing.assert_close(llama.state_dict()[name].double(), reference_weight(original[name], p),
                                       atol=1e-5, rtol=1e-5)


def test_bad_files_are_refused_naming_the_key(llama, tiny_model_dir, svd_dir, tmp_path):
    out = tmp_path / "out.safetensors"

    def refused(data: object, match: str, model: nn.Module = llama, **kwargs: object) -> None:
        ref_file = tmp_path / "ref.pt"
        torch.save(data, ref_file)
        with pytest.raises(ExpertError, match=match):
            import_reference_expert(ref_file, model, out=out, cache_dir=svd_dir, **kwargs)  # type: ignore[arg-type]
        assert not out.exists()

    logits = reference_logits(llama)
    first = "model.layers.0.mlp.gate_proj.weight"
    refused({**logits, first: logits[first][:-1]}, f"{first} has {logits[first].numel() - 1} values")
    refused({**logits, first: logits[first][None]}, "expected a vector")
    refused({k: v for k, v in logits.items() if k != first}, f"no vector for {first}")
    deeper = load(tiny_model_dir("adapt-llama-3", "llama", seed=1, num_layers=3))
    refused(reference_logits(deeper), "model.layers.2.mlp.gate_proj.weight is not an MLP weight")  # another model
    refused(ReferencePolicy(reference_logits(deeper)).state_dict(), "has 9 vectors, the model has 6")
    refused(["not", "a", "dict"], "dict of tensors")
    refused(logits, "expected 0123456789abcdef", expect_fingerprint="0123456789abcdef")
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(ExpertError, match="not a readable"):
        import_reference_expert(tmp_path / "junk.pt", llama, out=out, cache_dir=svd_dir)
    with pytest.raises(ExpertError, match="does not exist"):
        import_reference_expert(tmp_path / "missing.pt", llama, out=out, cache_dir=svd_dir)


def test_svf_import_cli(tiny_model_dir, tiny_zoo_model, tmp_path):
    model_dir = tiny_zoo_model(0)  # a model folder with a tokenizer, as `shoal` loads models
    model = load(model_dir)
    ref_file = tmp_path / "learnable_params.pt"
    torch.save(reference_logits(model), ref_file)
    out = tmp_path / "expert.safetensors"
    common = ["--model", str(model_dir), "--out", str(out), "--svd-cache", str(tmp_path / "svd")]
    result = CliRunner().invoke(cli, ["svf", "import", str(ref_file), *common, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["matrices"] == 6 and summary["parametrization"] == "reference"
    assert load_expert(out).meta.task == "learnable_params"
    out.unlink()
    other = load(tiny_model_dir("adapt-llama-3", "llama", seed=1, num_layers=3))
    wrong = tmp_path / "wrong.pt"
    torch.save(reference_logits(other), wrong)
    for bad in (str(wrong), str(tmp_path / "missing.pt")):
        result = CliRunner().invoke(cli, ["svf", "import", bad, *common], catch_exceptions=False)
        assert result.exit_code == 2 and result.stdout == ""
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # not progress bars
        assert len(errors) == 1 and errors[0].startswith("error: reference expert file")
        assert not out.exists()


def test_old_direct_expert_still_loads_and_applies_without_rescale(llama, svd_dir, tmp_path):
    from safetensors.torch import save_file

    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    z = {n: torch.full((factors.rank(n),), 0.5) for n in factors.names}
    old_meta = {"format_version": 1, "base_fingerprint": factors.fingerprint,
                "matrices": {n: list(factors.shapes[n]) for n in factors.names}, "task": "old", "objective": "sft"}
    path = tmp_path / "old.safetensors"  # written as shoal wrote experts before the parametrization field
    save_file(z, str(path), metadata={METADATA_KEY: json.dumps(old_meta)})
    old = load_expert(path, factors)
    assert old.meta.parametrization == "direct"
    adapter, _, _ = prepare(llama, [old], cache_dir=svd_dir)
    original = {n: p.detach().clone() for n, p in adapter.params.items()}
    with adapter.applied(old.z):  # z = 0.5 halves W under the direct form (the reference form would keep W)
        for n in factors.names:
            torch.testing.assert_close(adapter.params[n], 0.5 * original[n], atol=1e-5, rtol=1e-4)
    ref_file = tmp_path / "ref.pt"
    torch.save(reference_logits(llama), ref_file)
    new = load_expert(import_reference_expert(ref_file, llama, out=tmp_path / "new.safetensors", cache_dir=svd_dir))
    with pytest.raises(ConfigError, match="parametrizations"):
        prepare(llama, [old, new], cache_dir=svd_dir)
