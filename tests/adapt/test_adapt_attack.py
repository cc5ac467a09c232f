"""Bad inputs to ``shoal adapt`` and ``shoal svf``: each is one stderr line naming the problem and
exit 2 with nothing written, or the documented behaviour (a corrupt SVD cache is recomputed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shoal.adapt import load_or_compute_svd, make_meta, save_expert
from shoal.adapt.expert import METADATA_KEY
from shoal.adapt.train import state_path
from shoal.cli.main import cli
from shoal.eval import load_model


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_zoo_model) -> dict:
    """Experts for ``sort`` and ``count`` and a classifier expert on a tiny zoo-tokenizer Llama,
    written directly (z = 1: their content does not matter to these checks)."""
    root = tmp_path_factory.mktemp("adapt-attack")
    base = tiny_zoo_model(0)
    model, _ = load_model(base)
    factors = load_or_compute_svd(model, cache_dir=root / "svd")
    paths = {}
    for name, task, label in (("sort", "sort", None), ("count", "count", None), ("classifier", "routing", "router")):
        meta = make_meta(factors, task=task, label=label, objective="sft", parametrization="reference")
        paths[name] = save_expert(root / f"{name}.safetensors", factors.ones(), meta)
    return {"base": str(base), "root": root, "svd": root / "svd", "factors": factors, **paths}


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_one_line(code: int, stderr: str, *fragments: object) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


def adapt(world: dict, *experts: object, extra: tuple = ()) -> tuple[int, str, str]:
    return run("adapt", world["base"], "--experts", *experts, "--strategy", "base", "--task", "sort", "--limit", "2",
               "--svd-cache", world["svd"], "--quiet", *extra)


def _rewrite(source: Path, out: Path, tensors: Callable[[dict], dict] = lambda t: t,
             meta: Callable[[dict], object] = lambda m: m) -> Path:
    z = load_file(source)
    data = json.loads(safe_open(str(source), "pt").metadata()[METADATA_KEY])
    new_meta = meta(data)
    save_file(tensors(z), str(out),
              metadata=None if new_meta is None else {METADATA_KEY: new_meta if isinstance(new_meta, str)
                                                      else json.dumps(new_meta)})
    return out


FIRST = "model.layers.0.mlp.down_proj.weight"


def _set(z: dict, name: str, value: torch.Tensor) -> dict:
    return {**z, name: value}


EXPERT_CORRUPTIONS = {
    "extra metadata key": (dict(meta=lambda m: {**m, "colour": "red"}), "unknown key 'colour'"),
    "missing metadata key": (dict(meta=lambda m: {k: v for k, v in m.items() if k != "base_fingerprint"}),
                             "key 'base_fingerprint' is missing"),
    "bad parametrization": (dict(meta=lambda m: {**m, "parametrization": "weird"}), "key 'parametrization'"),
    "metadata not JSON": (dict(meta=lambda m: "{oops"), "not valid JSON"),
    "no metadata": (dict(meta=lambda m: None), "not an SVF expert"),
    "NaN z": (dict(tensors=lambda z: _set(z, FIRST, torch.full((32,), float("nan")))), f"{FIRST} holds NaN"),
    "infinite z": (dict(tensors=lambda z: _set(z, FIRST, torch.full((32,), float("inf")))), f"{FIRST} holds NaN"),
    "z of 1e30": (dict(tensors=lambda z: _set(z, FIRST, torch.full((32,), 1e30))), "1e+30, beyond"),
    "integer z": (dict(tensors=lambda z: _set(z, FIRST, torch.ones(32, dtype=torch.int32))), "dtype int32"),
    "2-D z": (dict(tensors=lambda z: _set(z, FIRST, torch.ones(4, 8))), "shape (4, 8)"),
    "short z": (dict(tensors=lambda z: _set(z, FIRST, torch.ones(5))), "5 values"),
    "z missing for a listed matrix": (dict(tensors=lambda z: {k: v for k, v in z.items() if k != FIRST}),
                                      f"lists matrix {FIRST}, which has no z vector"),
    "no z at all": (dict(tensors=lambda z: {}, meta=lambda m: {**m, "matrices": {}}), "holds no z vectors"),
}


@pytest.mark.parametrize("case", sorted(EXPERT_CORRUPTIONS))
def test_a_corrupt_expert_is_one_line_naming_it(world, tmp_path, case):
    change, message = EXPERT_CORRUPTIONS[case]
    bad = _rewrite(world["sort"], tmp_path / "bad.safetensors", **change)
    code, _, stderr = adapt(world, bad, world["count"])
    assert_one_line(code, stderr, bad, message)


def test_unreadable_missing_and_folder_experts(world, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(world["sort"].read_bytes()[:200])
    assert_one_line(*adapt(world, truncated)[::2], truncated, "not a readable safetensors file")
    missing = tmp_path / "missing.safetensors"
    for flag in ("--experts", "--classifier"):  # click's own check would print three lines, exit 64
        extra = ("--strategy", "classifier", "--classifier", missing) if flag == "--classifier" else ()
        code, _, stderr = run("adapt", world["base"], "--experts", world["sort"] if extra else missing,
                              "--task", "sort", *extra, "--quiet")
        assert_one_line(code, stderr, missing, "does not exist")
    assert_one_line(*adapt(world, tmp_path)[::2], tmp_path, "is a directory")


def test_a_plain_expert_is_refused_as_classifier_and_a_classifier_as_expert(world):
    code, _, stderr = run("adapt", world["base"], "--experts", world["sort"], world["count"], "--strategy",
                          "classifier", "--classifier", world["sort"], "--task", "sort", "--limit", "2",
                          "--svd-cache", world["svd"], "--quiet")
    assert_one_line(code, stderr, world["sort"], "not a classifier expert", "task 'sort'")
    assert_one_line(*adapt(world, world["sort"], world["classifier"])[::2], world["classifier"],
                    "is a classifier expert")
    code, _, stderr = run("adapt", world["base"], "--experts", world["sort"], world["count"], "--strategy",
                          "classifier", "--classifier", world["classifier"], "--task", "sort", "--limit", "2",
                          "--svd-cache", world["svd"], "--json", "--quiet")
    assert code == 0, stderr  # a real classifier expert is accepted
    code, _, stderr = run("adapt", world["base"], "--experts", world["sort"], "--strategy", "prompt",
                          "--classifier", world["classifier"], "--task", "sort", "--quiet")
    assert code == 64 and "--classifier goes with --strategy classifier" in stderr


@pytest.mark.parametrize("template, message", [
    ("no fields", "has no {prompt}"), ("{prompt} {colour}", "unknown field {colour}"),
    ("{prompt} {", "Single '{'"), ("{prompt!r}", "unknown field"),
])
def test_a_bad_pass1_template_is_refused(world, template, message):
    code, _, stderr = run("adapt", world["base"], "--experts", world["sort"], world["count"], "--task", "sort",
                          "--template", template, "--svd-cache", world["svd"], "--quiet")
    assert_one_line(code, stderr, "template", message)


def test_two_experts_of_one_category_are_refused(world):
    assert_one_line(*adapt(world, world["sort"], world["sort"])[::2], "distinct")
    code, _, stderr = run("svf", "train-classifier", world["base"], "--experts", world["sort"], world["sort"],
                          "--out", world["root"] / "never.safetensors", "--quiet")
    assert_one_line(code, stderr, "same category 'sort'")
    assert not (world["root"] / "never.safetensors").exists()


def _cache_file(world: dict, folder: Path) -> Path:
    folder.mkdir()
    source = world["svd"] / f"{world['factors'].fingerprint}.safetensors"
    target = folder / source.name
    target.write_bytes(source.read_bytes())
    return target


def _nan_singular_value(path: Path) -> None:
    tensors = load_file(path)
    tensors[f"{FIRST}::S"][0] = float("nan")
    save_file(tensors, str(path), metadata=safe_open(str(path), "pt").metadata())


def _other_u(path: Path) -> None:
    tensors = load_file(path)
    tensors[f"{FIRST}::U"] = torch.randn_like(tensors[f"{FIRST}::U"])
    save_file(tensors, str(path), metadata=safe_open(str(path), "pt").metadata())


def _wrong_shape(path: Path) -> None:
    tensors = load_file(path)
    tensors[f"{FIRST}::U"] = tensors[f"{FIRST}::U"][:, :3].contiguous()
    save_file(tensors, str(path), metadata=safe_open(str(path), "pt").metadata())


@pytest.mark.parametrize("corrupt, reason", [
    (_nan_singular_value, "NaN"), (_other_u, "do not give the matrix back"), (_wrong_shape, "has shape (32, 3)"),
    (lambda p: p.write_bytes(p.read_bytes()[:500]), "Error while deserializing"),
    (lambda p: p.write_bytes(os.urandom(3000)), "Error while deserializing"),
])
def test_a_corrupt_svd_cache_is_recomputed_with_a_warning(world, tmp_path, caplog, corrupt, reason):
    path = _cache_file(world, tmp_path / "svd")
    corrupt(path)
    with caplog.at_level("WARNING", logger="shoal"):  # the shoal logger's warnings reach stderr by default
        code, _, stderr = run("adapt", world["base"], "--experts", world["sort"], "--strategy", "base", "--task",
                              "sort", "--limit", "2", "--svd-cache", path.parent, "--json", "--quiet")
    assert code == 0, stderr
    warning = [r.getMessage() for r in caplog.records if "SVD cache" in r.getMessage()]
    assert len(warning) == 1 and str(path) in warning[0] and reason in warning[0] and "recomputing" in warning[0]
    rewritten = load_file(path)
    for name in world["factors"].names:
        assert torch.equal(rewritten[f"{name}::S"], world["factors"].S[name])


def test_an_svd_cache_that_cannot_be_a_folder_is_refused(world, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for folder in (afile, afile / "svd"):
        code, _, stderr = run("adapt", world["base"], "--experts", world["sort"], "--task", "sort",
                              "--svd-cache", folder, "--quiet")
        assert_one_line(code, stderr, "--svd-cache", afile, "is a file")
    blocked = tmp_path / "blocked"
    (blocked / f"{world['factors'].fingerprint}.safetensors").mkdir(parents=True)
    code, _, stderr = run("adapt", world["base"], "--experts", world["sort"], "--strategy", "base", "--task", "sort",
                          "--limit", "2", "--svd-cache", blocked, "--quiet")
    assert_one_line(code, stderr, blocked, "is a folder")


def _train(world: dict, out: Path, *extra: object) -> tuple[int, str, str]:
    return run("svf", "train", world["base"], "--task", "sort", "--objective", "sft", "--steps", "1",
               "--batch-size", "2", "--validation-limit", "2", "--out", out, "--svd-cache", world["svd"], "--quiet",
               *extra)


def _good_state(world: dict, tmp_path: Path) -> dict:
    out = tmp_path / "good.safetensors"
    code, _, stderr = _train(world, out)
    assert code == 0, stderr
    return torch.load(state_path(out), weights_only=True)


STATE_CORRUPTIONS = {
    "garbage": (lambda good, path: path.write_bytes(os.urandom(4000)), "is unreadable"),
    "truncated": (lambda good, path: (torch.save(good, path), path.write_bytes(path.read_bytes()[:2000])),
                  "empty or truncated"),
    "empty": (lambda good, path: path.write_bytes(b""), "empty or truncated"),
    "another base": (lambda good, path: torch.save({**good, "fingerprint": "0" * 16}, path), "another run"),
    "another task": (lambda good, path: torch.save({**good, "task": "count"}, path), "task count"),
    "a pickle of code": (lambda good, path: path.write_bytes(__import__("pickle").dumps(os.system)), "unreadable"),
    "NaN parameters": (lambda good, path: torch.save(
        {**good, "params": {k: torch.full_like(v, float("nan")) for k, v in good["params"].items()}}, path),
        "holds NaN"),
    "a vector of another length": (lambda good, path: torch.save(
        {**good, "params": {**good["params"], FIRST: torch.ones(3)}}, path), "has shape (3,)"),
    "no step": (lambda good, path: torch.save({k: v for k, v in good.items() if k != "step"}, path), "'step'"),
    "an optimizer of another run": (lambda good, path: torch.save(
        {**good, "optimizer": {"state": {}, "param_groups": []}}, path), "optimizer state"),
}


@pytest.mark.parametrize("case", sorted(STATE_CORRUPTIONS))
def test_a_bad_training_state_is_one_line_saying_what_to_do(world, tmp_path, case):
    good = _good_state(world, tmp_path)
    corrupt, message = STATE_CORRUPTIONS[case]
    out = tmp_path / "run.safetensors"
    corrupt(good, state_path(out))
    before = state_path(out).read_bytes()
    code, _, stderr = _train(world, out)
    assert_one_line(code, stderr, state_path(out), message, "remove it or pass --no-resume")
    assert not out.exists() and state_path(out).read_bytes() == before  # nothing written
    code, _, stderr = _train(world, out, "--no-resume")
    assert code == 0, stderr
    assert torch.load(state_path(out), weights_only=True)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_svf_train_out_paths_are_checked_before_training(world, tmp_path):
    afile = tmp_path / "weights.safetensors"
    save_file({"x": torch.ones(2)}, str(afile))
    before = afile.read_bytes()
    assert_one_line(*_train(world, tmp_path)[::2], "--out", tmp_path, "is a folder")
    assert_one_line(*_train(world, afile / "x.safetensors")[::2], "--out", afile, "is a file")
    assert_one_line(*_train(world, afile)[::2], "--out", afile, "is not an SVF expert")
    assert afile.read_bytes() == before
    assert_one_line(*_train(world, tmp_path / "x.safetensors", "--device", "tpu")[::2], "--device tpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_svf_import_checks_its_paths(world, tmp_path):
    code, _, stderr = run("svf", "import", tmp_path, "--model", world["base"], "--out", tmp_path / "x.safetensors",
                          "--quiet")
    assert_one_line(code, stderr, "REF_FILE", tmp_path, "is a folder")
    reference = tmp_path / "learnable_params.pt"
    torch.save({"x": torch.ones(2)}, reference)
    code, _, stderr = run("svf", "import", reference, "--model", world["base"], "--out", tmp_path, "--quiet")
    assert_one_line(code, stderr, "--out", tmp_path, "is a folder")


def test_help_still_describes_the_path_options():
    for args in (["adapt", "--help"], ["svf", "train", "--help"], ["svf", "train-classifier", "--help"]):
        code, stdout, _ = run(*args)
        assert code == 0 and "--svd-cache" in stdout and "SVD cache folder" in stdout
    code, stdout, _ = run("adapt", "--help")
    assert "SVF expert files" in stdout and "classifier expert" in stdout


def test_bad_training_options_are_refused_before_or_when_they_bite(world, tmp_path):
    out = tmp_path / "e.safetensors"
    assert_one_line(*_train(world, out, "--label", "other")[::2], "--label 'other'")
    code, _, stderr = _train(world, out, "--parametrization", "direct", "--lr", "1e30", "--clip", "1e30",
                             "--steps", "2", "--eval-every", "1")
    assert_one_line(code, stderr, "training diverged at step", "smaller lr")
    code, _, stderr = run("svf", "train-classifier", world["base"], "--experts", world["sort"], world["count"],
                          "--other-task", "sort", "--out", tmp_path / "c.safetensors", "--quiet")
    assert_one_line(code, stderr, "--other-task sort", world["sort"])
    assert not (tmp_path / "c.safetensors").exists()


def test_no_expert_with_nan_or_huge_values_is_written(world, tmp_path):
    from shoal.adapt import ExpertError

    factors = world["factors"]
    meta = make_meta(factors, task="sort")
    for value in (float("nan"), 1e30):
        z = {**factors.ones(), FIRST: torch.full((32,), value)}
        with pytest.raises(ExpertError, match=FIRST):
            save_expert(tmp_path / "e.safetensors", z, meta)
        assert list(tmp_path.iterdir()) == []
