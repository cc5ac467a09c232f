"""The drawing world: captions and splits, the micro build, its pipelines in diffusers' format."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("diffusers")

from shoal.zoo.captions import (ANY_CELL, ATTRIBUTES, GRID, Drawing, all_drawings,
                                drawing_splits, drawing_task, labels_of)
from shoal.zoo.diffusion_build import DRAWING_WORLD_VERSION
from shoal.zoo.diffusion_models import FEW_STEPS, MANY_STEPS, PROMPT_TOKENS, drawing_tokenizer
from shoal.zoo.languages import A_TO_B


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    """The micro drawing world, built through the CLI (``shoal zoo build --kind diffusion``)."""
    from click.testing import CliRunner

    from shoal.cli.main import cli
    from shoal.zoo.diffusion_build import load_drawing_world

    out = tmp_path_factory.mktemp("draw") / "world"
    result = CliRunner().invoke(cli, ["zoo", "build", "--kind", "diffusion", "--size", "micro",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    world = load_drawing_world("micro", 0, root=out)
    assert world is not None
    return world


def test_splits_are_disjoint_and_cover_every_drawing():
    splits = drawing_splits(0)
    seen = [d for split in splits.values() for d in split]
    assert len(seen) == len(set(seen)) == len(all_drawings()) == 4 * 3 * 2 * (GRID * GRID + 1)
    assert set(seen) == set(all_drawings())
    assert drawing_splits(1)["test"] != splits["test"]
    assert drawing_splits(0) == splits


def test_prompts_use_the_world_words_and_fit_the_text_encoder():
    tokenizer = drawing_tokenizer()
    drawing = next(d for d in all_drawings() if d.cell == 2)
    a, b = drawing.prompt("a"), drawing.prompt("b")
    assert a == f"{drawing.size} {drawing.colour} {drawing.obj} in 3 ."
    assert b.split()[:4] == [A_TO_B[w] for w in a.split()[:4]] and b.split()[4:] == a.split()[4:]
    anywhere = Drawing(drawing.obj, drawing.colour, drawing.size, ANY_CELL)
    assert anywhere.prompt("a") == f"{drawing.size} {drawing.colour} {drawing.obj} ."
    assert labels_of([anywhere])["cell"].tolist() == [-1]
    cells = {anywhere.scene(random.Random(i)).things[0].cell for i in range(40)}
    assert cells == set(range(GRID * GRID))  # an unnamed cell is drawn anywhere
    for d in all_drawings():
        for text in (d.prompt("a"), d.prompt("b")):
            ids = tokenizer(text).input_ids
            assert tokenizer.unk_token_id not in ids and len(ids) < PROMPT_TOKENS


def test_a_task_pairs_noise_across_languages_and_carries_labels():
    a, b = drawing_task(0, "test", "a", copies=2), drawing_task(0, "test", "b", copies=2)
    assert a.noise_seeds == b.noise_seeds and len(set(a.noise_seeds)) == len(a.prompts)
    assert a.prompts != b.prompts and a.targets == b.targets
    test = drawing_splits(0)["test"]
    assert len(a.prompts) == 2 * len(test)
    assert a.targets["cell"][:2] == (test[0].cell, test[0].cell)  # -1 when unnamed
    labels = labels_of(test)
    assert set(labels) == set(ATTRIBUTES)


def test_micro_world_holds_three_pipelines_and_a_judge(micro_world):
    manifest = json.loads((micro_world.root / "manifest.json").read_text())
    assert manifest["kind"] == "diffusion" and manifest["models"] == ["base", "lang", "fast"]
    assert manifest["few_steps"] == FEW_STEPS <= 4 < manifest["many_steps"] == MANY_STEPS
    assert manifest["drawing_world_version"] == DRAWING_WORLD_VERSION
    unet = json.loads((micro_world.model("base") / "unet" / "config.json").read_text())
    # three blocks: 8 x 8 latents -> 4 x 4 -> a 2 x 2 bottleneck, one position per cell
    assert len(unet["down_block_types"]) == 3 and unet["sample_size"] == 8 and GRID == 2
    for name in ("base", "lang", "fast"):
        index = json.loads((micro_world.model(name) / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline"
        # transformers 5 names PreTrainedTokenizerFast TokenizersBackend; either way the
        # class recorded is the world tokenizer's own, and loading uses it (next test)
        assert index["tokenizer"] == ["transformers", type(drawing_tokenizer()).__name__]
        assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
        scheduler = json.loads((micro_world.model(name) / "scheduler"
                                / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == "v_prediction"  # at zero terminal SNR (v3)
        assert scheduler["rescale_betas_zero_snr"] is True
    assert set(manifest["judge_accuracy_fresh_renders"]) == set(ATTRIBUTES) | {"all"}


def test_the_pipelines_load_offline_with_their_tokenizer_and_generate(micro_world):
    from shoal.zoo.diffusion_build import load_pipeline

    pipe = load_pipeline(micro_world.model("lang"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    index = json.loads((micro_world.model("lang") / "model_index.json").read_text())
    assert type(pipe.tokenizer).__name__ == index["tokenizer"][1]
    assert pipe.tokenizer.padding_side == "right" and pipe.tokenizer.model_max_length == PROMPT_TOKENS
    prompt = all_drawings()[5].prompt("b")
    expected = drawing_tokenizer()(prompt, padding="max_length", max_length=PROMPT_TOKENS).input_ids
    assert pipe.tokenizer(prompt, padding="max_length",
                          max_length=pipe.tokenizer.model_max_length).input_ids == expected
    images = pipe(prompt=[prompt, prompt], num_inference_steps=4, guidance_scale=1.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_loading_a_pipeline_prints_nothing_in_a_fresh_process(micro_world):
    """The library does not print: no transformers note about image processors (diffusers'
    pipeline imports trigger it once per process where torchvision is absent), no FutureWarning
    about diffusers' ``torch_dtype`` name, no progress bar."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from shoal.zoo.diffusion_build import load_pipeline; "
            "pipe = load_pipeline(Path(sys.argv[1])); print(pipe.unet.dtype)")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code, str(micro_world.model("lang"))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch.float32"
    assert done.stderr == ""


def test_the_specialists_differ_from_the_base_where_they_were_trained(micro_world):
    from safetensors.torch import load_file

    def weights(name, component):
        return load_file(str(micro_world.model(name) / component
                             / "diffusion_pytorch_model.safetensors"
                             if component == "unet" else micro_world.model(name) / component
                             / "model.safetensors"))

    base_te, fast_te = weights("base", "text_encoder"), weights("fast", "text_encoder")
    assert all(torch.equal(base_te[k], fast_te[k]) for k in base_te)  # distillation: UNet only
    base_unet, fast_unet = weights("base", "unet"), weights("fast", "unet")
    assert any(not torch.equal(base_unet[k], fast_unet[k]) for k in base_unet)
    # lang learns B with the base's text encoder frozen: its B knowledge is in its UNet
    lang_te, lang_unet = weights("lang", "text_encoder"), weights("lang", "unet")
    assert all(torch.equal(base_te[k], lang_te[k]) for k in base_te)
    assert any(not torch.equal(base_unet[k], lang_unet[k]) for k in base_unet if ".attn2." in k)


def test_a_finished_world_is_found_in_the_cache(micro_world):
    from click.testing import CliRunner

    from shoal.cli.main import cli
    from shoal.zoo.diffusion_build import build_drawing_world, load_drawing_world

    again = build_drawing_world("micro", seed=0, out=micro_world.root)
    assert again.manifest == micro_world.manifest
    assert load_drawing_world("micro", seed=1, root=micro_world.root) is None
    cached = CliRunner().invoke(cli, ["zoo", "build", "--kind", "diffusion", "--size", "micro",
                                      "--out", str(micro_world.root)])
    assert cached.exit_code == 0 and "cached" in cached.stderr


def test_zoo_references_name_drawing_models(micro_world, monkeypatch):
    import shutil

    from shoal.zoo.diffusion_build import default_drawing_root
    from shoal.zoo.references import resolve_zoo_reference

    monkeypatch.setenv("SHOAL_CACHE", str(micro_world.root.parent / "cache"))
    root = default_drawing_root("micro", 0)
    root.parent.mkdir(parents=True)
    shutil.copytree(micro_world.root, root)
    assert resolve_zoo_reference("drawing-micro/fast") == root / "fast"


def test_cli_refuses_a_foreign_folder_in_one_line(tmp_path):
    from click.testing import CliRunner

    from shoal.cli.main import cli

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["zoo", "build", "--kind", "diffusion", "--size", "micro",
                                      "--out", str(tmp_path / "mine")])
    assert result.exit_code == 2
    assert "is not a zoo world" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_unknown_size_and_foreign_folder_are_refused(tmp_path):
    from shoal.errors import ConfigError
    from shoal.zoo.diffusion_build import build_drawing_world
    from shoal.zoo.errors import ZooError

    with pytest.raises(ConfigError, match="unknown drawing-world size 'huge'"):
        build_drawing_world("huge", out=tmp_path / "w")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ZooError, match="is not a zoo world"):
        build_drawing_world("micro", out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_lang_trains_more_rounds_until_its_check_passes(micro_world, tmp_path, monkeypatch):
    """A lang whose B drawings at MANY_STEPS fall short of the check trains another round (its
    own seed); the check leaves every other model of the world as a build without it makes."""
    import dataclasses

    from safetensors.torch import load_file

    from shoal.zoo import diffusion_models
    from shoal.zoo.diffusion_build import build_drawing_world

    micro = diffusion_models.DRAWING_SIZES["micro"]
    assert micro.lang_rounds == 1 and micro_world.manifest["lang_check"] == {"rounds": 1, "steps": 10}
    monkeypatch.setitem(diffusion_models.DRAWING_SIZES, "micro",
                        dataclasses.replace(micro, lang_rounds=2, lang_check=2.0))  # cannot pass
    world = build_drawing_world("micro", out=tmp_path / "world")
    check = world.manifest["lang_check"]
    assert check["rounds"] == 2 and check["steps"] == 20 and check["passed"] is False
    assert [h["steps"] for h in check["history"]] == [10, 20]
    assert check["needed"] == pytest.approx(2.0 * check["base_a"], abs=2e-4)
    assert all(0 <= h["lang_b"] <= 1 for h in check["history"]) and check["copies"] == 8

    def weights(w, model, component="unet"):
        name = "diffusion_pytorch_model.safetensors" if component == "unet" else "model.safetensors"
        return load_file(str(w.model(model) / component / name))

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same(weights(world, "base"), weights(micro_world, "base"))
    assert same(weights(world, "fast"), weights(micro_world, "fast"))
    assert same(load_file(str(world.root / "judge" / "model.safetensors")),
                load_file(str(micro_world.root / "judge" / "model.safetensors")))
    assert same(weights(world, "lang", "text_encoder"), weights(micro_world, "lang", "text_encoder"))
    assert not same(weights(world, "lang"), weights(micro_world, "lang"))  # the second round
