"""EvoVLM-JP's static merge: a LLaVA's language model merged with an LLM specialist over the LLM
base, the vision tower and projector copied, the result a LLaVA folder transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.checkpoint import describe_tensor, module_of
from shoal.cli.main import cli
from tiny_llava import build_llava, build_llm

LLM_TO_VLM = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_trio")
    base = build_llm(root / "base", seed=0)
    return {"base": base, "spec": build_llm(root / "spec", seed=1, base=base, noise=0.05),
            "vlm": build_llava(root / "vlm", base, seed=2, noise=0.05)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def vlm_recipe(trio: dict[str, Path], method: str = "task_arithmetic", **extra: object) -> dict:
    return {"merge_method": method, "base_model": str(trio["base"]), "base_prefix_map": LLM_TO_VLM,
            "models": [{"model": str(trio["vlm"]), "parameters": {"weight": 0.7, "density": 0.6}},
                       {"model": str(trio["spec"]), "parameters": {"weight": 0.5, "density": 0.6},
                        "prefix_map": LLM_TO_VLM}], **extra}


def merge(tmp_path: Path, recipe: dict, name: str = "out") -> tuple[Path, object]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / name
    return out, CliRunner().invoke(cli, ["merge", str(path), str(out), "-q"])


def test_llava_names_are_described_in_both_spellings() -> None:
    for arch in ("LlavaForConditionalGeneration", "llava", None):
        for name in ("vision_tower.encoder.layers.1.mlp.fc1.weight", "model.vision_tower.pre_layrnorm.bias",
                     "multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.bias"):
            info = describe_tensor(name, arch)
            assert (info.layer, info.role) == (None, "vision"), (name, arch)
        for name, prefix in (("language_model.model.layers.1.self_attn.q_proj.weight", "language_model.model."),
                             ("model.language_model.layers.1.self_attn.q_proj.weight", "model.language_model.")):
            info = describe_tensor(name, arch)
            assert (info.prefix, info.layer, info.role) == (prefix, 1, "attention")
    assert describe_tensor("language_model.lm_head.weight", "llava").role == "lm_head"
    assert describe_tensor("model.language_model.embed_tokens.weight", "llava").role == "embed"
    assert module_of("language_model.model.norm.weight", "llava") == "text_decoder"
    assert module_of("lm_head.weight", "LlavaForConditionalGeneration") == "text_decoder"
    assert module_of("model.vision_tower.embeddings.class_embedding", "llava") == "vision_tower"
    assert module_of("multi_modal_projector.linear_1.weight", "llava") == "multi_modal_projector"
    assert module_of("model.layers.0.mlp.up_proj.weight", "llama") is None


def test_vlm_language_model_merges_with_the_llm_and_keeps_its_eyes(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    out, result = merge(tmp_path, vlm_recipe(trio))
    assert result.exit_code == 0, result.output
    got, vlm, base, spec = weights(out), weights(trio["vlm"]), weights(trio["base"]), weights(trio["spec"])
    assert set(got) == set(vlm)
    vision = [n for n in vlm if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert len(vision) > 20
    for name in vision:
        assert torch.equal(got[name], vlm[name]), name
    for name in base:  # task arithmetic, written out: base + 0.7 (vlm - base) + 0.5 (spec - base)
        out_name = "language_model." + name
        expected = base[name] + 0.7 * (vlm[out_name] - base[name]) + 0.5 * (spec[name] - base[name])
        torch.testing.assert_close(got[out_name], expected, rtol=1e-6, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((trio["vlm"] / "config.json").read_text())
    assert config["model_type"] == "llava" and "vocab_size" not in config
    assert config["text_config"]["vocab_size"] == source_config["text_config"]["vocab_size"]
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (trio["vlm"] / name).read_bytes(), name


def test_merged_vlm_loads_with_transformers_llava_class_in_a_fresh_process(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    out, result = merge(tmp_path, vlm_recipe(trio, "dare_ties", seed=5))
    assert result.exit_code == 0, result.output
    script = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoProcessor, LlavaForConditionalGeneration\n"
        "model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "batch = processor(images=[Image.new('RGB', (8, 8), (200, 30, 30))], text=['<image> w1 w2'],\n"
        "                  return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    ids = model.generate(**batch, max_new_tokens=3, do_sample=False)\n"
        "assert ids.shape[1] == batch['input_ids'].shape[1] + 3\n"
        "print(type(model).__name__, model.model.vision_tower.embeddings.class_embedding.sum().item())\n")
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name, class_sum = done.stdout.split()[-2:]
    assert name == "LlavaForConditionalGeneration"
    assert float(class_sum) == pytest.approx(weights(trio["vlm"])["vision_tower.embeddings.class_embedding"].sum().item())


def test_an_added_image_token_is_refused_naming_the_tensor_and_shapes(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    wider = build_llava(tmp_path / "vlm_wide", trio["base"], seed=2, extra_image_token=True)
    recipe = vlm_recipe(trio)
    recipe["models"][0]["model"] = str(wider)
    out, result = merge(tmp_path, recipe)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "shape mismatch" in line and ("embed_tokens.weight" in line or "lm_head.weight" in line), line
    assert "[33, 32]" in line and "[32, 32]" in line, line
    assert not out.exists()


def test_a_base_whose_map_leaves_no_unmapped_model_is_refused(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    recipe = vlm_recipe(trio)
    recipe["models"] = [recipe["models"][1]]
    out, result = merge(tmp_path, recipe)
    assert result.exit_code == 2
    assert "base_model" in result.output and "prefix map" in result.output
    assert not out.exists()


def modules_recipe(trio: dict[str, Path], **modules: object) -> dict:
    recipe = vlm_recipe(trio, "dare_ties", seed=5)
    text_models = recipe.pop("models")
    recipe["modules"] = {"text_decoder": {"models": text_models},
                         "vision_tower": {"models": [{"model": str(trio["vlm"])}]},
                         "multi_modal_projector": {"models": [{"model": str(trio["vlm"])}]}, **modules}
    return recipe


def test_modules_recipe_gives_the_models_recipe_bitwise(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    plain, result = merge(tmp_path, vlm_recipe(trio, "dare_ties", seed=5), "plain")
    assert result.exit_code == 0, result.output
    by_module, result = merge(tmp_path, modules_recipe(trio), "modules")
    assert result.exit_code == 0, result.output
    a, b = weights(plain), weights(by_module)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the saved recipe reruns as it is
    again, result = merge(tmp_path, yaml.safe_load((by_module / "shoal_recipe.yaml").read_text()), "again")
    assert result.exit_code == 0, result.output
    c = weights(again)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_module_parameters_come_before_the_recipes(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    recipe = modules_recipe(trio)
    recipe["merge_method"] = "task_arithmetic"
    for entry in recipe["modules"]["text_decoder"]["models"]:
        entry["parameters"] = {}
    recipe["parameters"] = {"weight": 0.25}
    recipe["modules"]["text_decoder"]["parameters"] = {"weight": [{"filter": "mlp", "value": 0.5}]}
    out, result = merge(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    got, vlm, base, spec = weights(out), weights(trio["vlm"]), weights(trio["base"]), weights(trio["spec"])
    for name, weight in (("model.layers.0.mlp.up_proj.weight", 0.5), ("model.layers.0.self_attn.q_proj.weight", 0.25)):
        out_name = "language_model." + name
        expected = base[name] + weight * (vlm[out_name] - base[name]) + weight * (spec[name] - base[name])
        torch.testing.assert_close(got[out_name], expected, rtol=1e-6, atol=1e-6)


def test_a_module_left_out_is_not_written_and_a_warning_says_so(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    recipe = modules_recipe(trio)
    del recipe["modules"]["vision_tower"]
    path = tmp_path / "partial.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = CliRunner().invoke(cli, ["merge", str(path), str(tmp_path / "partial")])
    assert result.exit_code == 0, result.output
    assert "modules: vision_tower not listed" in result.output
    got = weights(tmp_path / "partial")
    assert not any(n.startswith("vision_tower.") for n in got)
    assert any(n.startswith("multi_modal_projector.") for n in got)


@pytest.mark.parametrize(("change", "message"), [
    ({"vision_encoder": {"models": [{"model": "VLM"}]}}, "has no module 'vision_encoder' (it has: text_decoder, "
                                                         "vision_tower, multi_modal_projector)"),
    ({"vision_tower": {"slices": [{"sources": [{"model": "VLM", "layer_range": [0, 1]}]}]}},
     "modules.vision_tower.slices"),
    ({"vision_tower": {}}, "exactly one of 'models' or 'slices'"),
])
def test_bad_modules_are_one_line_errors(tmp_path: Path, trio, change: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    recipe = modules_recipe(trio)
    recipe["modules"].update(json.loads(json.dumps(change).replace("VLM", str(trio["vlm"]))))
    out, result = merge(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_a_mapped_base_cannot_stand_in_for_tensors_two_models_merge(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    other = build_llava(tmp_path / "vlm2", trio["spec"], seed=4)
    recipe = vlm_recipe(trio)
    recipe["models"][1] = {"model": str(other), "parameters": {"weight": 0.5}}
    out, result = merge(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    assert "prefix map does not reach it" in result.output and "multi_modal_projector." in result.output
    assert not out.exists()
