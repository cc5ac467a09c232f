"""``shoal demo vlm`` for real, on the micro VLM world: every row, the picture grid, and the
evolved LLaVA (vision tower and projector bitwise the VLM's, loaded by transformers in a fresh
process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shoal.eval import evaluate, load_model
from shoal.studies.vlm_demo import CROSS_TASK, run_vlm_demo
from shoal.zoo import build_vlm_world, build_zoo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("vlm-demo-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SHOAL_CACHE", str(cache))
    try:
        words = build_zoo("micro", seed=0, threads=1)
        world = build_vlm_world("micro", seed=0, threads=1)
        result = run_vlm_demo(size="micro", out=cache / "demo", trials=3, limit=6, seed=0)
        yield world, words, result
    finally:
        mp.undo()


def test_rows_are_the_six_of_the_issue_on_the_whole_test_split(demo) -> None:
    world, _, result = demo
    names = [r.model.split(" (")[0] for r in result.rows]
    assert names == ["VLM", "language specialist", "uniform merge", "uniform search",
                     "VLM-only per-layer control", "evolved"]
    assert all(r.n == 500 and 0.0 <= r.exact <= r.rouge_l <= 1.0 for r in result.rows)
    data = json.loads((result.out / "demo.json").read_text())
    assert [r["model"] for r in data["rows"]] == [r.model for r in result.rows]
    assert result.pictures.is_file() and result.evolved_recipe.is_file()
    # evolved minus each other row, paired over the same test examples
    assert [d.baseline for d in result.differences] == [r.model for r in result.rows[:-1]]
    for row, d in zip(result.rows, result.differences):
        assert d.n == 500 and d.exact == pytest.approx(result.rows[-1].exact - row.exact)
        assert d.rouge_l == pytest.approx(result.rows[-1].rouge_l - row.rouge_l)
    assert len(data["scores"][result.rows[0].model]) == 500
    assert "evolved − row" in (result.out / "report.md").read_text()


def test_source_rows_equal_the_models_scored_on_their_own(demo) -> None:
    world, words, result = demo
    model, processor = load_model(world.model("vlm"))
    vlm = evaluate(model, processor, world.task(CROSS_TASK), "test")
    assert (result.rows[0].rouge_l, result.rows[0].n) == (vlm.score, vlm.n)
    # the specialist's language model in the VLM's body, put there by hand
    lang, _ = load_model(words.model("lang"))
    with torch.no_grad():
        model.model.language_model.load_state_dict(lang.model.state_dict())
        model.lm_head.weight.copy_(lang.lm_head.weight)
    alone = evaluate(model, processor, world.task(CROSS_TASK), "test")
    assert result.rows[1].rouge_l == pytest.approx(alone.score, abs=1e-9)


def test_evolved_llava_keeps_the_vision_tower_and_loads_in_a_fresh_process(demo) -> None:
    world, _, result = demo
    assert result.model is not None
    merged = load_file(result.model / "model.safetensors")
    source = load_file(world.model("vlm") / "model.safetensors")
    assert merged.keys() == source.keys()
    vision = [k for k in source if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(torch.equal(merged[k], source[k]) for k in vision)
    assert any(not torch.equal(merged[k], source[k]) for k in source if k.startswith("language_model."))
    script = (
        "import sys, numpy as np\n"
        "from transformers import AutoProcessor, LlavaForConditionalGeneration\n"
        "model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "image = np.full((32, 32, 3), 200, np.uint8)\n"
        "inputs = processor(text=['tom has ' + processor.image_token + ' . now tom has'],\n"
        "                   images=[image], return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=3, do_sample=False)\n"
        "print(out.shape[1] - inputs['input_ids'].shape[1])\n")
    run = subprocess.run([sys.executable, "-c", script, str(result.model)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 1 <= int(run.stdout.strip().splitlines()[-1]) <= 3
