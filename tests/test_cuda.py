"""The CUDA paths give the CPU's results: merging, evaluation, SVF training and adaptation.

These run only where ``torch.cuda.is_available()`` (CI has no GPU; a lent GPU machine runs
them with ``pytest tests/test_cuda.py``). The CPU result is the reference: every merge method
through ``shoal merge --device cuda``, scores of ``shoal eval``, and an SVF expert trained on the
GPU, each within its dtype's tolerance of what the CPU computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from shoal.checkpoint import open_checkpoint
from shoal.cli.main import cli
from shoal.merge.registry import all_methods

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {"model.embed_tokens.weight": (600, 256), "model.layers.0.mlp.up_proj.weight": (512, 128),
          "model.norm.weight": (256,)}
TOLERANCE = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def trio(request, tmp_path_factory) -> list[Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cuda-trio")
    gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in SHAPES.items()}
    folders = []
    for i, name in enumerate(("base", "a", "b")):
        tensors = {k: (v + (torch.randn(v.shape, generator=gen) * 0.002 if i else 0)).to(request.param)
                   for k, v in base.items()}
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        folders.append(root / name)
    return folders


def _recipe(method: str, base: Path, a: Path, b: Path) -> dict:
    spec = next(m for m in all_methods() if m.name == method)
    names = {p.name for p in spec.params}
    if method == "passthrough":
        return {"merge_method": method, "models": [{"model": str(a)}]}
    if method == "slerp":
        return {"merge_method": method, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
                "parameters": {"t": 0.3}}
    per_model = {k: v for k, v in (("weight", 0.6), ("density", 0.5)) if k in names}
    recipe: dict = {"merge_method": method, "seed": 3,
                    "models": [{"model": str(m), "parameters": dict(per_model)} for m in (a, b)]}
    if spec.needs_base:
        recipe["base_model"] = str(base)
    return recipe


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as reader:  # the index and headers validate
        return {name: reader.get(name) for name in reader.tensor_names()}


@pytest.mark.parametrize("method", [m.name for m in all_methods()])
def test_every_method_merges_on_the_gpu_as_on_the_cpu(trio, method: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(method, *trio)))
    for device in ("cpu", "cuda"):
        code, _, stderr = run("merge", str(recipe), str(tmp_path / device), "--device", device, "--quiet")
        assert code == 0, stderr
    cpu, gpu = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "cuda")
    assert set(cpu) == set(gpu) == set(SHAPES)
    for name, expected in cpu.items():
        assert gpu[name].dtype == expected.dtype and gpu[name].device.type == "cpu"
        # selections (TIES, DARE masks, breadcrumbs) are exact: at most a handful of entries may
        # flip where GPU and CPU round a magnitude differently; everything else is within tolerance
        close = torch.isclose(gpu[name].float(), expected.float(), **TOLERANCE[expected.dtype])
        assert close.float().mean() >= 0.999, (name, (~close).sum().item())


def test_merged_model_from_the_gpu_loads_and_matches(tiny_model_dir, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("cuda-base")
    a = tiny_model_dir("cuda-a", seed=1, base=base)
    b = tiny_model_dir("cuda-b", seed=2, base=base)
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                                      "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}}
                                                 for m in (a, b)]}))
    for device in ("cpu", "cuda"):
        code, _, stderr = run("merge", str(recipe), str(tmp_path / device), "--device", device, "--quiet")
        assert code == 0, stderr
    cpu = AutoModelForCausalLM.from_pretrained(tmp_path / "cpu").state_dict()
    gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "cuda").state_dict()
    for name, expected in cpu.items():
        torch.testing.assert_close(gpu[name], expected, rtol=1e-5, atol=1e-6)


def test_eval_svf_and_adapt_on_the_gpu_match_the_cpu(tiny_zoo_model, tmp_path: Path) -> None:
    model = str(tiny_zoo_model(0))
    scores = {}
    for device in ("cpu", "cuda"):
        code, stdout, stderr = run("eval", model, "--task", "sort", "--limit", "16", "--device", device, "--json",
                                   "--quiet")
        assert code == 0, stderr
        scores[device] = json.loads(stdout)
    assert scores["cuda"]["n"] == scores["cpu"]["n"] == 16
    assert abs(scores["cuda"]["score"] - scores["cpu"]["score"]) <= 1 / 16  # one greedy near-tie at most
    experts = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"sort-{device}.safetensors"
        code, stdout, stderr = run("svf", "train", model, "--task", "sort", "--objective", "sft", "--steps", "3",
                                   "--lr", "0.05", "--batch-size", "4", "--eval-every", "3", "--validation-limit",
                                   "8", "--out", str(out), "--svd-cache", str(tmp_path / f"svd-{device}"),
                                   "--device", device, "--json", "--quiet")
        assert code == 0, stderr
        experts[device] = load_file(str(out))
    assert set(experts["cpu"]) == set(experts["cuda"])
    for name, z in experts["cpu"].items():
        torch.testing.assert_close(experts["cuda"][name], z, rtol=1e-3, atol=1e-3)
    code, stdout, stderr = run("adapt", model, "--experts", str(tmp_path / "sort-cuda.safetensors"), "--strategy",
                               "prompt", "--task", "sort", "--limit", "8", "--svd-cache", str(tmp_path / "svd-cuda"),
                               "--device", "cuda", "--json", "--quiet")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == 8 and 0 <= result["score"] <= 1
