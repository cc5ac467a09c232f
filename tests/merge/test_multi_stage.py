"""Multi-stage recipes (mergekit-multi's format) through ``shoal merge`` and ``shoal merge-multi``.

Expected outputs are the single-stage merges run by hand, one after the other.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.cli.main import cli

GOLDENS = Path(__file__).resolve().parents[1] / "goldens"


def _builder():  # type: ignore[no-untyped-def]
    name = "shoal_golden_tiny_checkpoints"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GOLDENS / "tiny_checkpoints.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multi_ckpt")
    _builder().build_all(root, ["llama_base", "llama_a", "llama_b", "llama_c", "llama_vocab_b"])
    return root


def _stages(ckpt: Path, second_model: str = "llama_c") -> str:
    first = {"name": "first", "merge_method": "linear", "parameters": {"weight": 0.5}, "dtype": "float32",
             "models": [{"model": str(ckpt / "llama_a")}, {"model": str(ckpt / "llama_b")}]}
    final = {"merge_method": "task_arithmetic", "base_model": str(ckpt / "llama_base"), "dtype": "float32",
             "models": [{"model": "first", "parameters": {"weight": 0.5}},
                        {"model": str(ckpt / second_model), "parameters": {"weight": 0.5}}]}
    return yaml.safe_dump(first, sort_keys=False) + "---\n" + yaml.safe_dump(final, sort_keys=False)


def _invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_stages_give_the_single_merges_run_one_after_the_other(tmp_path: Path, ckpt: Path) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_stages(ckpt))
    result = _invoke("merge", recipe, tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml", "out"]  # the temporary stages are gone
    first, final = yaml.safe_load_all(recipe.read_text())
    first.pop("name")
    (tmp_path / "1.yaml").write_text(yaml.safe_dump(first))
    assert _invoke("merge", tmp_path / "1.yaml", tmp_path / "by_hand" / "first", "-q").exit_code == 0
    final["models"][0]["model"] = str(tmp_path / "by_hand" / "first")
    (tmp_path / "2.yaml").write_text(yaml.safe_dump(final))
    assert _invoke("merge", tmp_path / "2.yaml", tmp_path / "by_hand" / "final", "-q").exit_code == 0
    got, expected = _weights(tmp_path / "out"), _weights(tmp_path / "by_hand" / "final")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_merge_multi_keeps_stages_and_a_rerun_skips_the_complete_ones(tmp_path: Path, ckpt: Path) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_stages(ckpt))
    stages, out = tmp_path / "stages", tmp_path / "final"
    result = _invoke("merge-multi", recipe, "-I", stages, "--out-path", out, "-q", "--lazy-unpickle", "--random-seed", 3)
    assert result.exit_code == 0, result.output
    assert (stages / "first" / "config.json").is_file() and (out / "model.safetensors").is_file()
    marks = {p: p.stat().st_ino for p in (stages / "first" / "model.safetensors", out / "model.safetensors")}
    again = _invoke("merge-multi", recipe, "-I", stages, "--out-path", out, "-q")
    assert again.exit_code == 0
    assert again.stdout.count("is complete, not merged again") == 2
    assert all(p.stat().st_ino == ino for p, ino in marks.items())  # untouched
    forced = _invoke("merge-multi", recipe, "-I", stages, "--out-path", out, "--no-lazy", "-q")
    assert forced.exit_code == 0 and "wrote" in forced.stdout
    assert all(p.stat().st_ino != ino for p, ino in marks.items())  # merged again, replaced whole
    dry = _invoke("merge-multi", recipe, "-I", tmp_path / "dry", "--out-path", tmp_path / "dry_out", "--dry-run")
    assert dry.exit_code == 0 and "first: linear" in dry.stdout and "(after first)" in dry.stdout
    assert not (tmp_path / "dry").exists() and not (tmp_path / "dry_out").exists()


def test_a_failing_stage_leaves_the_stages_before_it_complete_and_nothing_else(tmp_path: Path, ckpt: Path) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_stages(ckpt, second_model="llama_vocab_b"))  # its vocabulary differs: shapes do not match
    stages, out = tmp_path / "stages", tmp_path / "final"
    result = _invoke("merge-multi", recipe, "-I", stages, "--out-path", out)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shape mismatch" in errors[0], result.stderr
    assert sorted(p.name for p in stages.iterdir()) == ["first"] and not out.exists()
    recipe.write_text(_stages(ckpt))  # fixed: the rerun merges only what is left
    fixed = _invoke("merge-multi", recipe, "-I", stages, "--out-path", out, "-q")
    assert fixed.exit_code == 0
    assert "stage first: " in fixed.stdout and "is complete, not merged again" in fixed.stdout
    assert (out / "model.safetensors").is_file()
    # through shoal merge: nothing at OUT and no temporary stages left
    recipe.write_text(_stages(ckpt, second_model="llama_vocab_b"))
    failed = _invoke("merge", recipe, tmp_path / "out2")
    assert failed.exit_code == 2 and not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]


def _doc(**keys: object) -> str:
    return yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 0.5}, **keys}, sort_keys=False)


@pytest.mark.parametrize(("docs", "message"), [
    (lambda m: _doc(name="x", models=[{"model": m}]) + "---\n" + _doc(name="x", models=[{"model": "x"}]),
     "duplicate stage name 'x'"),
    (lambda m: _doc(models=[{"model": m}]) + "---\n" + _doc(models=[{"model": m}]),
     "a second recipe without a name"),
    (lambda m: _doc(name="p", models=[{"model": "q"}]) + "---\n" + _doc(name="q", models=[{"model": "p"}]) + "---\n"
     + _doc(models=[{"model": "p"}]), "stages name each other in a circle: p -> q -> p"),
    (lambda m: _doc(name="a/b", models=[{"model": m}]) + "---\n" + _doc(models=[{"model": "a/b"}]),
     "must be a folder name"),
    (lambda m: _doc(name="s", models=[{"model": m}]) + "---\n" + _doc(name="t", models=[{"model": "s"}]),
     "every stage has a name"),
    (lambda m: _doc(name="s", models=[{"model": m}], wieght=1) + "---\n" + _doc(models=[{"model": "s"}]),
     "stage s (document 1): wieght: unknown key 'wieght'"),
])
def test_bad_multi_stage_recipes_are_one_line_and_write_nothing(tmp_path: Path, ckpt: Path, docs, message: str) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(docs(str(ckpt / "llama_a")))
    result = _invoke("merge", recipe, tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]


def test_merge_multi_option_errors(tmp_path: Path, ckpt: Path) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_stages(ckpt))
    missing = _invoke("merge-multi", recipe, "-I", tmp_path / "s")
    assert missing.exit_code == 64 and "--out-path is required" in missing.stderr and not (tmp_path / "s").exists()
    single = tmp_path / "one.yaml"
    single.write_text(_doc(models=[{"model": str(ckpt / "llama_a")}, {"model": str(ckpt / "llama_b")}]))
    wrong = _invoke("merge", single, tmp_path / "o", "-I", tmp_path / "s")
    assert wrong.exit_code == 64 and "--intermediate-dir" in wrong.stderr and not (tmp_path / "o").exists()
