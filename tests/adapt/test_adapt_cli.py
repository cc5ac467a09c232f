"""``shoal svf train`` and ``shoal adapt`` end to end on a tiny model with the zoo tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shoal.adapt import load_expert
from shoal.adapt.train import state_path
from shoal.cli.main import cli


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory, tiny_zoo_model) -> dict[str, Path]:
    return {"base": tiny_zoo_model(0), "other": tiny_zoo_model(1), "root": tmp_path_factory.mktemp("adapt-cli")}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_svf_train_writes_an_expert_and_resumes(zoo_models):
    root = zoo_models["root"]
    out = root / "sort.safetensors"
    common = ["svf", "train", str(zoo_models["base"]), "--task", "sort", "--objective", "sft", "--lr", "0.05",
              "--batch-size", "4", "--eval-every", "2", "--validation-limit", "8", "--out", str(out),
              "--svd-cache", str(root / "svd"), "--json", "--quiet"]
    code, stdout, stderr = run(*common, "--steps", "2")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["expert"] == str(out) and summary["parameters"] == 192 and summary["steps"] == 2
    assert load_expert(out).meta.task == "sort"
    code, stdout, _ = run(*common, "--steps", "4")
    assert code == 0 and json.loads(stdout)["steps"] == 4
    assert torch.load(state_path(out), weights_only=True)["step"] == 4
    code, stdout, _ = run(*common[:-2], "--steps", "1", "--no-resume", "--objective", "reinforce", "--kl", "0.1",
                          "--label", "sorting")
    assert code == 0 and "validation" in stdout and str(out) in stdout
    meta = load_expert(out).meta
    assert (meta.objective, meta.kl, meta.label) == ("reinforce", 0.1, "sorting")


def test_adapt_evaluates_generates_and_refuses_foreign_experts(zoo_models):
    root = zoo_models["root"]
    svd = ["--svd-cache", str(root / "svd")]
    experts = []
    for task in ("sort", "count"):
        path = root / f"e-{task}.safetensors"
        code, _, stderr = run("svf", "train", str(zoo_models["base"]), "--task", task, "--objective", "sft",
                              "--steps", "1", "--batch-size", "2", "--validation-limit", "4", "--out", str(path),
                              *svd, "--quiet")
        assert code == 0, stderr
        experts.append(str(path))
    base = str(zoo_models["base"])
    code, stdout, stderr = run("adapt", base, "--experts", *experts, "--strategy", "prompt", "--task", "sort",
                               "--limit", "4", *svd, "--json", "--quiet")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == 4 and sum(result["categories"].values()) == 4 and 0 <= result["score"] <= 1
    classifier = root / "classifier.safetensors"
    code, _, stderr = run("svf", "train-classifier", base, "--experts", *experts, "--steps", "1", "--batch-size", "2",
                          "--validation-limit", "4", "--out", str(classifier), *svd, "--quiet")
    assert code == 0 and not stderr, stderr  # --quiet: not even transformers' loading bars
    code, stdout, stderr = run("adapt", base, "--experts", *experts, "--strategy", "classifier", "--classifier",
                               str(classifier), "--prompt", "sort : 3 1 2 =", "count : cups hats =",
                               "--max-new-tokens", "3", *svd, "--quiet")
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(("[sort]", "[count]", "[other]")) for line in lines)
    code, stdout, stderr = run("adapt", base, "--experts", *experts, "--strategy", "few-shot", "--task", "sort",
                               "--limit", "3", "--shots", "2", "--cem-iterations", "1", "--cem-population", "2",
                               *svd, "--json", "--quiet")
    assert code == 0, stderr
    assert len(json.loads(stdout)["alpha"]) == 2
    other = str(zoo_models["other"])
    code, stdout, stderr = run("adapt", other, "--experts", experts[0], "--strategy", "base", "--task", "sort",
                               "--limit", "2", *svd, "--quiet")
    assert code == 2 and "e-sort.safetensors" in stderr and "--transfer" in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [stderr.strip().splitlines()[-1]]
    code, _, stderr = run("adapt", other, "--experts", experts[0], "--strategy", "prompt", "--task", "sort",
                          "--limit", "2", "--transfer", *svd, "--quiet")
    assert code == 0, stderr
    code, _, stderr = run("adapt", base, "--experts", experts[0], "--strategy", "classifier", "--task", "sort", *svd)
    assert code == 64 and "--classifier" in stderr and "train-classifier" in stderr  # a usage error
