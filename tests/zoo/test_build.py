"""Building, caching and loading the micro world; the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import shoal.zoo.build as build_module
from shoal.cli.main import cli
from shoal.zoo import ZooError, ZooWorld, build_zoo, get_zoo_task, load_zoo


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory: pytest.TempPathFactory) -> ZooWorld:
    return build_zoo("micro", out=tmp_path_factory.mktemp("zoo") / "micro", seed=0, threads=1)


def _weights(world: ZooWorld, name: str) -> dict[str, torch.Tensor]:
    return load_file(world.model(name) / "model.safetensors")


def test_world_has_base_and_one_specialist_per_trained_task(micro_world: ZooWorld) -> None:
    assert micro_world.models[0] == "base"
    assert set(micro_world.specialist_task) == set(micro_world.models[1:])
    trained = set(micro_world.specialist_task.values())
    assert trained <= set(micro_world.tasks)
    assert micro_world.held_out and not trained & set(micro_world.held_out)
    manifest = json.loads((micro_world.root / "manifest.json").read_text())
    assert manifest["size"] == "micro" and manifest["seed"] == 0
    with pytest.raises(ZooError, match="nope"):
        micro_world.model("nope")
    # Specialists are fine-tunes of the base: same tensors, different values.
    base = _weights(micro_world, "base")
    for name in micro_world.specialist_task:
        weights = _weights(micro_world, name)
        assert weights.keys() == base.keys()
        assert any(not torch.equal(weights[k], base[k]) for k in base)


def test_models_load_and_generate_with_transformers(micro_world: ZooWorld) -> None:
    task = get_zoo_task("math_a")
    prompts = [e.prompt for e in task.examples("test")[:3]]
    for name in micro_world.models:
        tokenizer = AutoTokenizer.from_pretrained(micro_world.model(name))
        model = AutoModelForCausalLM.from_pretrained(micro_world.model(name))
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 3
        assert batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 3
        assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_same_seed_builds_identical_weights(micro_world: ZooWorld, tmp_path: Path) -> None:
    # (That another seed gives other weights is checked on the training loop in test_train.)
    again = build_zoo("micro", out=tmp_path / "again", seed=0, threads=1)
    for name in micro_world.models:
        first, second = _weights(micro_world, name), _weights(again, name)
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_cached_world_is_returned_without_training(micro_world: ZooWorld,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("the cached world was rebuilt")

    monkeypatch.setattr(build_module, "train", no_training)
    assert build_zoo("micro", out=micro_world.root, seed=0) == micro_world
    assert load_zoo("micro", 0, root=micro_world.root) == micro_world
    assert load_zoo("micro", 1, root=micro_world.root) is None


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_train = build_module.train
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(kwargs.get("stage"))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(build_module, "train", fail_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        build_zoo("micro", out=tmp_path / "world", seed=0, threads=1)
    assert list(tmp_path.iterdir()) == []
    assert load_zoo("micro", 0, root=tmp_path / "world") is None


def test_refuses_to_overwrite_a_folder_that_is_not_a_world(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ZooError, match="mine"):
        build_zoo("micro", out=tmp_path / "mine", force=True)
    with pytest.raises(ZooError, match="mine"):
        build_zoo("micro", out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_build_then_cached(tmp_path: Path, micro_world: ZooWorld,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    out = tmp_path / "cli-world"
    result = runner.invoke(cli, ["zoo", "build", "--size", "micro", "--out", str(out), "--quiet",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    world = load_zoo("micro", 0, root=out)
    assert world is not None
    base = _weights(world, "base")
    reference = _weights(micro_world, "base")
    assert all(torch.equal(base[k], reference[k]) for k in base)
    again = runner.invoke(cli, ["zoo", "build", "--size", "micro", "--out", str(out)])
    assert again.exit_code == 0 and "cached" in again.stderr


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(cli, ["zoo", "path", "--size", "micro", "--seed", "7"])
    assert result.exit_code == 2
    assert "micro-seed7" in result.stderr and "shoal zoo build" in result.stderr
    listed = runner.invoke(cli, ["zoo", "tasks"])
    assert listed.exit_code == 0 and "math_b" in listed.stdout


def test_score_card_covers_every_model_and_task(micro_world: ZooWorld) -> None:
    from shoal.zoo.card import score_card

    card = score_card(micro_world, limit=6)
    assert card.models == micro_world.models and card.tasks == micro_world.tasks
    # Reference for one cell: plain transformers greedy generation, one prompt at a time.
    task = get_zoo_task("sort")
    tokenizer = AutoTokenizer.from_pretrained(micro_world.model("sort"))
    model = AutoModelForCausalLM.from_pretrained(micro_world.model("sort"))
    total = 0.0
    for example in task.examples("test")[:6]:
        ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=task.max_new_tokens, do_sample=False)
        total += task.score(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                            example)
    assert card.cells["sort"]["sort"].score == total / 6
    assert all(cell.n == 6 for row in card.cells.values() for cell in row.values())
    assert "| sort |" in card.markdown() and "(n=6)" in card.markdown()


def test_cli_card_prints_the_matrix(micro_world: ZooWorld) -> None:
    result = CliRunner().invoke(cli, ["zoo", "card", "--size", "micro", "--out",
                                      str(micro_world.root), "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["scores"]
    assert set(scores) == set(micro_world.models)
    assert all(set(row) == set(micro_world.tasks) for row in scores.values())
    assert all(cell["n"] == 3 and 0.0 <= cell["score"] <= 1.0
               for row in scores.values() for cell in row.values())


def test_stale_staging_of_a_dead_build_is_removed(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    stale = tmp_path / f".world.staging-{int(finished.stdout)}"
    live = tmp_path / f".world.staging-{os.getpid()}"
    for folder in (stale, live):
        (folder / "base").mkdir(parents=True)
    build_module._remove_stale_staging(tmp_path / "world")
    assert not stale.exists() and live.exists()
