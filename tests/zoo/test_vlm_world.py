"""The VLM world: built from the micro language world, loaded by transformers' own LLaVA
classes, the language world left as it was, and its image tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.cli.main import cli
from shoal.zoo import (ZooError, build_vlm_world, build_zoo, get_image_task, load_vlm_world,
                       resolve_zoo_ref)
from shoal.zoo.languages import A_WORDS, B_WORDS, NUMBERS, PUNCTUATION
from shoal.zoo.vision_tasks import IMAGE_TASKS
from shoal.zoo.vlm_build import VLM_WORLD_VERSION, check_examples, training_examples

VLM_FOLDER = f"micro-seed0-vlm-v{VLM_WORLD_VERSION}"


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the micro language world and its VLM world (seed 0)."""
    root = tmp_path_factory.mktemp("vlm-cache")
    words = build_zoo("micro", out=root / "zoo" / "micro-seed0-v1", seed=0, threads=1)
    build_vlm_world("micro", out=root / "zoo" / VLM_FOLDER, seed=0,
                    language_world=words.root, threads=1)
    return root


@pytest.fixture()
def world(cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SHOAL_CACHE", str(cache))
    found = load_vlm_world("micro", 0)
    assert found is not None
    return found


def test_vlm_loads_with_transformers_llava_classes_and_answers(world) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = world.model("vlm")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    example = get_image_task("vqa_a").examples("test")[0]
    prompt = example.prompt.replace("<image>", processor.image_token)
    inputs = processor(text=[prompt], images=list(example.images), return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16  # 4 x 4 patches
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_vlm_language_model_has_the_base_shapes_and_vocabulary(world) -> None:
    vlm = load_file(world.model("vlm") / "model.safetensors")
    base = load_file(world.model("base") / "model.safetensors")
    # transformers writes LLaVA in the hub layout: the language model under "language_model."
    language = {k[len("language_model."):]: v for k, v in vlm.items()
                if k.startswith("language_model.")}
    assert language.keys() == base.keys()
    assert all(language[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(language[k], base[k]) for k in base)  # it was fine-tuned
    others = {k for k in vlm if not k.startswith("language_model.")}
    assert others and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in others)
    config = json.loads((world.model("vlm") / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_index"] == 3  # <unk>
    assert "_name_or_path" not in config["text_config"]
    vocab = json.loads((world.model("vlm") / "tokenizer.json").read_text())["model"]["vocab"]
    base_vocab = json.loads((world.model("base") / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == base_vocab


def test_the_language_world_is_left_as_it_was(cache: Path) -> None:
    manifest = json.loads((cache / "zoo" / "micro-seed0-v1" / "manifest.json").read_text())
    assert manifest["world_version"] == 1 and "vlm" not in manifest["models"]
    assert sorted(p.name for p in (cache / "zoo" / "micro-seed0-v1").iterdir()) == sorted(
        ["manifest.json", *manifest["models"]])
    vlm_manifest = json.loads((cache / "zoo" / VLM_FOLDER / "manifest.json").read_text())
    assert vlm_manifest["kind"] == "vlm" and vlm_manifest["models"] == ["vlm"]
    assert set(vlm_manifest["trained_on"]).isdisjoint(vlm_manifest["held_out"])
    assert "vqa_b" in vlm_manifest["held_out"]
    training = vlm_manifest["training"]["vlm"]
    assert set(vlm_manifest["trained_on"]) <= set(training["checks"][-1])
    assert training["checks"][-1]["final"] and training["steps"] >= training["checks"][0]["step"]


def test_training_stops_when_the_checks_pass_and_cools_down_first(world) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoal.zoo.corpus import documents, pretraining_mix
    from shoal.zoo.sizes import VlmTrainingSettings, get_vlm_size
    from shoal.zoo.vlm_train import _lr_factor, new_processor, new_vlm, train_vlm
    import random

    spec = get_vlm_size("micro")
    checks = {name: rows[:2] for name, rows in check_examples("micro", 0).items()}
    base = AutoModelForCausalLM.from_pretrained(world.model("base"))
    processor = new_processor(AutoTokenizer.from_pretrained(world.model("base")), spec.vision)
    common = dict(batch_size=4, replay_rows=1, vision_lr=1e-3, language_lr=1e-3, warmup=1,
                  check_every=2, cooldown=3)
    # a target every model reaches: checked once at step 2, cooled down 3 steps, stopped
    easy = VlmTrainingSettings(steps=50, target=0.0, **common)
    run = train_vlm(new_vlm(base, spec.vision, seed=0), processor, training_examples("micro", 0)[:12],
                    documents(pretraining_mix(), random.Random(0)), easy, spec.vision, seed=0,
                    checks=checks)
    assert run.target_reached and run.cooldown_from == 2 and run.steps == 5
    assert [c["step"] for c in run.checks] == [2, 5] and set(checks) <= set(run.checks[0])
    # an unreachable target: checked until the cool-down must start, then stopped at `steps`
    hard = VlmTrainingSettings(steps=8, target=1.1, **common)
    run = train_vlm(new_vlm(base, spec.vision, seed=0), processor, training_examples("micro", 0)[:12],
                    documents(pretraining_mix(), random.Random(0)), hard, spec.vision, seed=0,
                    checks=checks)
    assert not run.target_reached and run.cooldown_from == 5 and run.steps == 8
    assert [c["step"] for c in run.checks] == [2, 4, 8]
    assert [round(_lr_factor(s, hard, 5), 3) for s in (0, 4, 5, 6, 7)] == [1.0, 1.0, 0.7, 0.4, 0.1]
    # the checked examples are unseen: not trained on, not in an evaluation split
    from shoal.zoo.vlm_build import _task_counts

    for name, count in _task_counts("micro").items():
        drawn = get_image_task(name, 0, train_size=count + spec.train.check_size).drawn("train")
        checked, trained = {d.key() for d in drawn[count:]}, {d.key() for d in drawn[:count]}
        held = {d.key() for s in ("fitness", "validation", "test") for d in get_image_task(name).drawn(s)}
        assert len(checked) == spec.train.check_size and not checked & (trained | held)
        assert [e.prompt for e in check_examples("micro", 0)[name]] == [d.prompt for d in drawn[count:]]


def test_cached_vlm_world_is_returned_without_training(world, monkeypatch) -> None:
    import shoal.zoo.vlm_build as vlm_build

    monkeypatch.setattr(vlm_build, "_train", lambda *a, **k: pytest.fail("rebuilt"))
    assert build_vlm_world("micro", seed=0) == world
    assert load_vlm_world("micro", 1) is None


def test_zoo_reference_names_the_vlm_and_its_world_seed(world) -> None:
    from shoal.eval.registry import task_seed_of_models

    path = Path(resolve_zoo_ref("zoo:micro/vlm"))
    assert path == world.root / "vlm"
    assert task_seed_of_models([path]) == 0
    assert Path(resolve_zoo_ref("zoo:micro/lang")) == world.model("lang")
    with pytest.raises(ZooError, match="no model 'nope'"):
        world.model("nope")


def test_training_is_deterministic_for_a_seed(world) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoal.zoo.corpus import documents, pretraining_mix
    from shoal.zoo.sizes import VlmTrainingSettings, get_vlm_size
    from shoal.zoo.vlm_train import new_processor, new_vlm, train_vlm
    import random

    spec = get_vlm_size("micro")
    settings = VlmTrainingSettings(steps=3, batch_size=4, replay_rows=2, vision_lr=1e-3,
                                   language_lr=1e-3, warmup=1)
    examples = training_examples("micro", 0)[:12]
    base = AutoModelForCausalLM.from_pretrained(world.model("base"))
    processor = new_processor(AutoTokenizer.from_pretrained(world.model("base")), spec.vision)
    runs = []
    for seed in (0, 0, 1):
        model = new_vlm(base, spec.vision, seed=seed)
        replay = documents(pretraining_mix(), random.Random(seed))
        runs.append((train_vlm(model, processor, examples, replay, settings, spec.vision, seed=seed),
                     model.state_dict()))
    assert runs[0][0].losses == runs[1][0].losses
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert runs[0][0].losses != runs[2][0].losses


def test_image_tasks_use_only_world_words_and_b_tasks_speak_b() -> None:
    a_words, b_words = set(A_WORDS), set(B_WORDS)
    shared = set(NUMBERS) | set(PUNCTUATION) | {"<image>"}
    for name, spec in IMAGE_TASKS.items():
        task = get_image_task(name)
        for example in task.drawn("test")[:200]:
            words = set(example.prompt.split()) | set(example.target.split())
            language = b_words if spec.language == "b" else a_words
            assert words <= language | shared, (name, words - language - shared)
            assert example.prompt.count("<image>") == 1
        assert task.examples("test")[0].images[0].shape == (32, 32, 3)


def test_image_splits_are_disjoint_fixed_and_held_out_from_training() -> None:
    keys = {}
    for name in IMAGE_TASKS:
        task = get_image_task(name)
        splits = {s: {d.key() for d in task.drawn(s)} for s in ("train", "fitness", "validation", "test")}
        assert all(len(v) == len(task.drawn(s)) for s, v in splits.items())
        names = list(splits)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert splits[a].isdisjoint(splits[b]), (name, a, b)
        assert get_image_task(name, 1).drawn("test") != task.drawn("test")
        keys[name] = splits
    # what the VLM trains on: prefixes of the trained tasks' train splits, never a held-out
    # example and never a story in B
    from shoal.zoo.languages import QUANTITY_VERBS, to_b
    from shoal.zoo.vision_tasks import Drawn

    trained = training_examples("micro", 0)
    held = {k for splits in keys.values() for s in ("fitness", "validation", "test") for k in splits[s]}
    drawn = [d for name in ("look_a", "look_b", "vqa_a") for d in get_image_task(name).drawn("train")]
    by_prompt = {d.prompt for d in drawn}
    assert all(e.prompt in by_prompt for e in trained)
    assert not {d.key() for d in drawn} & held
    b_verbs = {to_b(v) for v in QUANTITY_VERBS}
    assert not any(set(e.prompt.split()) & b_verbs for e in trained)
    assert isinstance(drawn[0], Drawn)


def test_task_provider_serves_image_tasks() -> None:
    from shoal.eval import get_task

    assert {"vqa_b", "look_a", "math_b"} <= set(__import__("shoal.zoo.tasks", fromlist=["x"]).TASK_PROVIDER.names())
    task = get_task("vqa_b", seed=1)
    assert task.name == "vqa_b" and task.seed == 1


def test_cli_builds_lists_and_finds_the_vlm_world(world, tmp_path: Path, monkeypatch) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["zoo", "build", "--size", "micro", "--kind", "vlm"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(world.root) and "cached" in result.stderr
    found = runner.invoke(cli, ["zoo", "path", "--size", "micro", "--kind", "vlm"])
    assert found.exit_code == 0 and found.stdout.strip() == str(world.root)
    listed = runner.invoke(cli, ["zoo", "tasks"])
    assert "vqa_b" in listed.stdout and "[image]" in listed.stdout
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path))
    missing = runner.invoke(cli, ["zoo", "path", "--size", "micro", "--seed", "3", "--kind", "vlm"])
    assert missing.exit_code == 2 and "--kind vlm" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_card_and_eval_cover_the_vlm(world) -> None:
    from shoal.eval import evaluate, load_model
    from shoal.zoo.card import score_card

    card = score_card(world, limit=4)
    assert card.models == ("vlm",) and set(card.tasks) == set(IMAGE_TASKS)
    model, processor = load_model(world.model("vlm"))
    direct = evaluate(model, processor, world.task("vqa_b"), "test", limit=4)
    cell = card.cells["vlm"]["vqa_b"]
    assert (cell.score, cell.n, cell.exact) == (direct.score, 4, direct.correct / 4)
    assert "exact" in card.markdown()
    result = CliRunner().invoke(cli, ["zoo", "card", "--size", "micro", "--kind", "vlm",
                                      "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["scores"]["vlm"]) == set(IMAGE_TASKS)
    evaluated = CliRunner().invoke(cli, ["eval", "zoo:micro/vlm", "--task", "vqa_b", "--limit", "3",
                                         "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    row = json.loads(evaluated.stdout)
    assert row["n"] == 3 and row["score"] == pytest.approx(
        evaluate(model, processor, world.task("vqa_b"), "test", limit=3).score)


def test_failed_vlm_build_leaves_nothing_and_foreign_folders_are_refused(cache: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    import shoal.zoo.vlm_build as vlm_build

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(vlm_build, "_train", killed)
    language = cache / "zoo" / "micro-seed0-v1"
    with pytest.raises(RuntimeError, match="killed"):
        build_vlm_world("micro", out=tmp_path / "vlm", language_world=language)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ZooError, match="not a zoo world"):
        build_vlm_world("micro", out=tmp_path / "mine", language_world=language, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ZooError, match="not a finished micro language world"):
        build_vlm_world("micro", out=tmp_path / "other", language_world=tmp_path / "mine")
    result = CliRunner().invoke(cli, ["zoo", "build", "--size", "micro", "--kind", "vlm", "--out",
                                      str(tmp_path / "mine")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
