"""Merging diffusion pipelines: diffusers folders and single files, component by component, per UNet block.

Tiny pipelines are built here (never downloaded); expected tensors come from the source files with
plain formulas, and the merged outputs are loaded by diffusers and made to generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from diffusion_tiny import build_tiny_pipeline, build_tiny_sdxl, generate, to_single_file
from shoal.cli.main import cli
from shoal.errors import MergeError, RecipeError
from shoal.merge import merge, parse_recipe
from shoal.merge.execute import compute_op
from shoal.merge.plan import plan_merge
from shoal.merge.registry import all_methods

UNET = "diffusion_pytorch_model.safetensors"
BLOCKS = ["IN00", "IN01", "IN02", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"]  # the tiny UNet's


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("diffusion-merge")
    base = build_tiny_pipeline(root / "base")
    found = {"base": base}
    for i in (1, 2):
        found[f"ft{i}"] = build_tiny_pipeline(root / f"ft{i}", seed=i, base=base)
    for key in list(found):
        found[f"{key}.sf"] = to_single_file(found[key], root / f"{key}.safetensors")
    return found


def load_pipeline(folder: Path):  # type: ignore[no-untyped-def]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def load_single_file(file: Path, config: Path):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(file), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def open_all(names: list[str]):  # type: ignore[no-untyped-def]
    from shoal.checkpoint import open_checkpoint

    return {name: open_checkpoint(name) for name in names}


def test_linear_folder_merge_loads_generates_and_copies_the_vae(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"merge_method": "linear", "models": [{"model": str(pipes["ft1"]), "parameters": {"weight": 3.0}},
                                                   {"model": str(pipes["ft2"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "merged"
    merge(parse_recipe(recipe), out)
    pipe = load_pipeline(out)
    image = generate(pipe)
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(image).all()
    a, b = load_file(pipes["ft1"] / "unet" / UNET), load_file(pipes["ft2"] / "unet" / UNET)
    merged = load_file(out / "unet" / UNET)
    for name in a:
        assert torch.allclose(merged[name], (3 * a[name] + b[name]) / 4, atol=1e-6), name
    te = load_file(out / "text_encoder" / "model.safetensors")
    te1, te2 = load_file(pipes["ft1"] / "text_encoder" / "model.safetensors"), load_file(pipes["ft2"] / "text_encoder" / "model.safetensors")
    assert all(torch.allclose(te[n], (3 * te1[n] + te2[n]) / 4, atol=1e-6) for n in te1)
    # the VAE is copied from the reference (the first model), byte for byte
    vae, vae_src = load_file(out / "vae" / UNET), load_file(pipes["ft1"] / "vae" / UNET)
    assert vae.keys() == vae_src.keys() and all(torch.equal(vae[n], vae_src[n]) for n in vae)
    assert json.loads((out / "model_index.json").read_text()) == json.loads((pipes["ft1"] / "model_index.json").read_text())
    assert (out / "tokenizer").is_dir() and (out / "scheduler" / "scheduler_config.json").is_file()


def test_components_key_chooses_what_merges(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(pipes["base"]),
              "components": {"unet": "copy", "vae": "merge", "text_encoder": "copy"},
              "models": [{"model": str(pipes["ft1"]), "parameters": {"weight": 1.0}},
                         {"model": str(pipes["ft2"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "merged"
    result = merge(parse_recipe(recipe), out)
    assert dict(result.plan.components) == {"text_encoder": "copy", "unet": "copy", "vae": "merge"}
    base, a, b = (load_file(pipes[k] / "vae" / UNET) for k in ("base", "ft1", "ft2"))
    vae = load_file(out / "vae" / UNET)
    for name in base:
        assert torch.allclose(vae[name], base[name] + (a[name] - base[name]) + (b[name] - base[name]), atol=1e-6)
    unet, unet_base = load_file(out / "unet" / UNET), load_file(pipes["base"] / "unet" / UNET)
    assert all(torch.equal(unet[n], unet_base[n]) for n in unet_base)
    assert torch.isfinite(generate(load_pipeline(out))).all()


def test_a_gradient_over_blocks_gives_each_block_its_value(pipes) -> None:  # type: ignore[no-untyped-def]
    values = [i / 8 for i in range(9)]  # one anchor per block: block k gets k / 8
    recipe = parse_recipe({"merge_method": "linear", "parameters": {"normalize": False},
                           "models": [{"model": str(pipes["ft1"]), "parameters": {"weight": values}},
                                      {"model": str(pipes["ft2"]), "parameters": {
                                          "weight": [{"filter": "IN02", "value": 0.25}, {"value": 0.0}]}}]})
    readers = open_all(recipe.source_models())
    plan = plan_merge(recipe, readers)
    expected = {"unet/conv_in.weight": (0.0, 0.0),  # IN00
                "unet/down_blocks.0.resnets.0.conv1.weight": (1 / 8, 0.0),  # IN01
                "unet/down_blocks.0.downsamplers.0.conv.weight": (2 / 8, 0.25),  # IN02
                "unet/down_blocks.1.resnets.0.conv1.weight": (3 / 8, 0.0),  # IN03
                "unet/mid_block.attentions.0.proj_in.weight": (4 / 8, 0.0),  # M00
                "unet/up_blocks.0.resnets.1.conv1.weight": (6 / 8, 0.0),  # OUT01
                "unet/up_blocks.1.attentions.1.proj_out.weight": (1.0, 0.0),  # OUT03
                "unet/conv_out.weight": (1.0, 0.0),  # OUT03: the last output block
                "unet/time_embedding.linear_1.weight": (0.0, 0.0)}  # no block: the first anchor
    by_name = {op.name: op for op in plan.ops}
    for name, weights in expected.items():
        assert dict(by_name[name].params)["weight"] == pytest.approx(weights), name
    op = by_name["unet/down_blocks.0.downsamplers.0.conv.weight"]
    a, b = (readers[r.model].get(r.tensor) for r in op.models)
    assert torch.allclose(compute_op(op, lambda r: readers[r.model].get(r.tensor)), 0.25 * a + 0.25 * b, atol=1e-6)
    # text-encoder tensors run over its two layers: layer 0 -> 0.0, layer 1 -> 1.0
    assert dict(by_name["text_encoder/encoder.layers.1.mlp.fc1.weight"].params)["weight"][0] == pytest.approx(1.0)
    assert by_name["vae/decoder.conv_out.weight"].method == "copy"


def method_recipe(spec, pipes, single: bool = False) -> dict:  # type: ignore[no-untyped-def]
    key = (lambda k: str(pipes[k + ".sf"])) if single else (lambda k: str(pipes[k]))
    count = 1 if spec.max_models == 1 else 2
    params: dict = {}
    names = {p.name for p in spec.params}
    if "weight" in names:
        params["weight"] = 0.5
    if "density" in names:
        params["density"] = 0.6
    top = {"t": 0.5} if "t" in names else {}
    recipe = {"merge_method": spec.name, "seed": 3, "parameters": top,
              "models": [{"model": key(f"ft{i}"), "parameters": dict(params)} for i in range(1, count + 1)]}
    if spec.needs_base or spec.name in ("slerp", "nuslerp") and count == 1:
        recipe["base_model"] = key("base")
    if spec.name == "model_stock":
        recipe["models"].append({"model": key("base")})
    return recipe


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_every_method_merges_a_pipeline(spec, pipes) -> None:  # type: ignore[no-untyped-def]
    recipe = parse_recipe(method_recipe(spec, pipes))
    readers = open_all(recipe.source_models())
    plan = plan_merge(recipe, readers)
    reference = readers[plan.reference]
    merged_ops = [op for op in plan.ops if op.method != "copy"]
    assert merged_ops and all(op.name.startswith(("unet/", "text_encoder/")) for op in merged_ops)
    for op in plan.ops[::7]:
        tensor = compute_op(op, lambda r: readers[r.model].get(r.tensor), compat=recipe.compat)
        assert tuple(tensor.shape) == reference.shape(op.name) and torch.isfinite(tensor).all(), op.name
        if op.name.startswith("vae/"):
            assert torch.equal(tensor, reference.get(op.name))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_merged_folders_load_and_generate(method: str, pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = next(s for s in all_methods() if s.name == method)
    out = tmp_path / "merged"
    merge(parse_recipe(method_recipe(spec, pipes)), out)
    assert torch.isfinite(generate(load_pipeline(out))).all()


def test_single_file_merge_loads_with_from_single_file(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = next(s for s in all_methods() if s.name == "dare_ties")
    out = tmp_path / "merged"
    result = merge(parse_recipe(method_recipe(spec, pipes, single=True)), out)
    assert result.plan.output_layout == "single_file"
    file = out / "model.safetensors"
    merged, base = load_file(file), load_file(pipes["base.sf"])
    assert merged.keys() == base.keys()  # the web UI's names, as the reference has them
    vae = [n for n in base if n.startswith("first_stage_model.")]
    assert vae and all(torch.equal(merged[n], base[n]) for n in vae)
    unet = [n for n in base if n.startswith("model.diffusion_model.")]
    assert any(not torch.equal(merged[n], base[n]) for n in unet)
    pipe = load_single_file(file, pipes["base"])
    image = generate(pipe)
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(image).all()


def test_bad_diffusion_recipes_are_refused(pipes, tmp_path: Path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    two = [{"model": str(pipes["ft1"])}, {"model": str(pipes["ft2"])}]
    with pytest.raises(RecipeError, match="unknown component 'unet_2'.*text_encoder, unet, vae"):
        merge(parse_recipe({"merge_method": "linear", "components": {"unet_2": "merge"}, "models": two}), tmp_path / "a")
    with pytest.raises(RecipeError, match="components"):
        parse_recipe({"merge_method": "linear", "components": {"unet": "blend"}, "models": two})
    mixed = [{"model": str(pipes["ft1"])}, {"model": str(pipes["ft2.sf"])}]
    with pytest.raises(RecipeError, match="diffusers folder but .* single file"):
        merge(parse_recipe({"merge_method": "linear", "models": mixed}), tmp_path / "b")
    llm = tiny_model_dir("llama-a")
    with pytest.raises(RecipeError, match="not a diffusion pipeline"):
        merge(parse_recipe({"merge_method": "linear", "models": two + [{"model": str(llm)}]}), tmp_path / "c")
    with pytest.raises(RecipeError, match="components: applies to diffusion pipelines"):
        merge(parse_recipe({"merge_method": "linear", "components": {"unet": "merge"},
                            "models": [{"model": str(llm)}, {"model": str(llm)}]}), tmp_path / "d")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_a_mismatched_source_leaves_nothing_half_written(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from safetensors.torch import save_file

    odd = tmp_path / "odd"
    shutil.copytree(pipes["ft2"], odd)
    unet = load_file(odd / "unet" / UNET)
    unet["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    save_file(unet, str(odd / "unet" / UNET))
    recipe = {"merge_method": "linear", "models": [{"model": str(pipes["ft1"])}, {"model": str(odd)}]}
    with pytest.raises(MergeError, match="shape mismatch for tensor 'unet/conv_out.weight'"):
        merge(parse_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["odd"]


def run(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_merges_a_pipeline_and_dry_run_lists_components(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(pipes["base"]), "seed": 1,
        "components": {"text_encoder": "copy"},
        "parameters": {"density": [{"filter": "M00", "value": 1.0}, {"value": 0.5}]},
        "models": [{"model": str(pipes["ft1"]), "parameters": {"weight": 1.0}},
                   {"model": str(pipes["ft2"]), "parameters": {"weight": [0.0, 1.0]}}]}))
    dry = run(["merge", recipe, tmp_path / "out", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "components (diffusers): text_encoder copy, unet merge, vae copy" in dry.output
    assert "unet/mid_block.attentions.0.proj_in.weight" in dry.output and not (tmp_path / "out").exists()
    done = run(["merge", recipe, tmp_path / "out"])
    assert done.exit_code == 0, done.output
    assert torch.isfinite(generate(load_pipeline(tmp_path / "out"))).all()
    assert (tmp_path / "out" / "shoal_recipe.yaml").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("text_encoder: copy", "text_encoder_3: copy"))
    failed = run(["merge", bad, tmp_path / "out2"])
    assert failed.exit_code == 2 and "unknown component 'text_encoder_3'" in failed.output
    assert len(failed.output.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()


def test_sharded_output_tokenizer_source_and_the_in_memory_merge(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Shards load in diffusers; the tokenizer comes from ``tokenizer_source``; the tensors merged in
    memory (plan + compute_op, as evolve's candidates are) are bitwise those written, on either backend."""
    import shutil

    from shoal.merge.execute import ExecutorOptions

    other_tokenizer = tmp_path / "ft2-tok"
    shutil.copytree(pipes["ft2"], other_tokenizer)
    config = json.loads((other_tokenizer / "tokenizer" / "tokenizer_config.json").read_text())
    config["model_max_length"] = 15
    (other_tokenizer / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    spec = next(s for s in all_methods() if s.name == "dare_ties")
    raw = method_recipe(spec, pipes)
    raw["models"][1]["model"] = str(other_tokenizer)
    raw["tokenizer_source"] = str(other_tokenizer)
    recipe = parse_recipe(raw)
    fast, reference = tmp_path / "fast", tmp_path / "reference"
    merge(recipe, fast, shard_size=40_000)
    merge(recipe, reference, shard_size=40_000, options=ExecutorOptions(backend="reference"))
    unet_index = fast / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    assert unet_index.is_file() and (fast / "text_encoder" / "model.safetensors.index.json").is_file()
    assert json.loads((fast / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 15
    readers = open_all(recipe.source_models())
    plan = plan_merge(recipe, readers)
    written: dict[str, torch.Tensor] = {}
    for folder in (fast / "unet", fast / "text_encoder", fast / "vae"):
        for shard in folder.glob("*.safetensors"):
            written.update({f"{folder.name}/{k}": v for k, v in load_file(shard).items()})
    again: dict[str, torch.Tensor] = {}
    for folder in (reference / "unet", reference / "text_encoder", reference / "vae"):
        for shard in folder.glob("*.safetensors"):
            again.update({f"{folder.name}/{k}": v for k, v in load_file(shard).items()})
    assert written.keys() == again.keys() == {op.name for op in plan.ops}
    for op in plan.ops:
        in_memory = compute_op(op, lambda r: readers[r.model].get(r.tensor), compat=recipe.compat)
        assert torch.equal(in_memory, written[op.name]) and torch.equal(written[op.name], again[op.name]), op.name
    pipe = load_pipeline(fast)
    assert pipe.tokenizer.model_max_length == 15 and torch.isfinite(generate(pipe)).all()


def test_single_file_extras_are_copied_and_half_precision_sources(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    sources = []
    for key in ("ft1.sf", "ft2.sf"):
        state = {k: v.half() for k, v in load_file(pipes[key]).items()}
        state["alphas_cumprod"] = torch.linspace(1, 0, 10, dtype=torch.float64) * (2 if key == "ft2.sf" else 1)
        sources.append(tmp_path / Path(key).name.replace(".sf", ".safetensors"))
        save_file(state, str(sources[-1]))
    recipe = {"merge_method": "slerp", "base_model": str(sources[0]), "parameters": {"t": 0.5},
              "out_dtype": "float32", "models": [{"model": str(sources[1])}]}
    result = merge(parse_recipe(recipe), tmp_path / "out")
    assert dict(result.plan.components)["other"] == "copy"
    merged, first = load_file(tmp_path / "out" / "model.safetensors"), load_file(sources[0])
    assert torch.equal(merged["alphas_cumprod"], first["alphas_cumprod"])
    assert merged["model.diffusion_model.out.2.weight"].dtype == torch.float32
    assert merged["first_stage_model.decoder.conv_out.weight"].dtype == torch.float16  # copied as stored
    assert torch.equal(merged["first_stage_model.decoder.conv_out.weight"], first["first_stage_model.decoder.conv_out.weight"])


def test_chat_template_is_refused_for_pipelines(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"merge_method": "linear", "chat_template": "chatml",
              "models": [{"model": str(pipes["ft1"])}, {"model": str(pipes["ft2"])}]}
    with pytest.raises(RecipeError, match="chat_template"):
        merge(parse_recipe(recipe), tmp_path / "out")


def test_the_example_recipe_runs_as_shown(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``shoal merge examples/diffusion_blocks.yaml OUT`` with the example's folders made tiny pipelines."""
    example = Path(__file__).resolve().parents[2] / "examples" / "diffusion_blocks.yaml"
    text = example.read_text()
    for name, key in (("models/sd15-base", "base"), ("models/sd15-style-a", "ft1"), ("models/sd15-style-b", "ft2")):
        assert name in text
        text = text.replace(name, str(pipes[key]))
    recipe = tmp_path / "diffusion_blocks.yaml"
    recipe.write_text(text)
    done = run(["merge", recipe, tmp_path / "sd-blocks"])
    assert done.exit_code == 0, done.output
    readers = open_all(parse_recipe(yaml.safe_load(text)).source_models())
    plan = plan_merge(parse_recipe(yaml.safe_load(text)), readers)
    by_name = {op.name: dict(op.params) for op in plan.ops}
    assert by_name["unet/mid_block.resnets.0.conv1.weight"]["weight"][1] == pytest.approx(0.7)
    assert by_name["text_encoder/encoder.layers.0.mlp.fc1.weight"]["weight"][1] == pytest.approx(0.3)
    assert torch.isfinite(generate(load_pipeline(tmp_path / "sd-blocks"))).all()


def test_sdxl_folders_merge_both_text_encoders(tmp_path: Path) -> None:
    base = build_tiny_sdxl(tmp_path / "xl-base")
    tunes = [build_tiny_sdxl(tmp_path / f"xl-ft{i}", seed=i, base=base) for i in (1, 2)]
    recipe = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
              "models": [{"model": str(t), "parameters": {"weight": 0.5}} for t in tunes]}
    out = tmp_path / "merged"
    result = merge(parse_recipe(recipe), out)
    assert dict(result.plan.components) == {"text_encoder": "merge", "text_encoder_2": "merge", "unet": "merge",
                                            "vae": "copy"}
    merged = load_file(out / "text_encoder_2" / "model.safetensors")
    source = load_file(base / "text_encoder_2" / "model.safetensors")
    assert merged.keys() == source.keys() and any(not torch.equal(merged[n], source[n]) for n in merged)
    pipe = load_pipeline(out)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and torch.isfinite(generate(pipe)).all()


def test_a_model_without_a_merged_component_is_named(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(pipes["ft2.sf"]).items() if k.startswith("model.diffusion_model.")},
              str(unet_only))
    recipe = {"merge_method": "linear", "models": [{"model": str(pipes["ft1.sf"])}, {"model": str(unet_only)}]}
    with pytest.raises(RecipeError, match="has no component 'text_encoder'.*text_encoder: copy"):
        merge(parse_recipe(recipe), tmp_path / "out")
    recipe["components"] = {"text_encoder": "copy"}
    merged = load_file(merge(parse_recipe(recipe), tmp_path / "out").out / "model.safetensors")
    first = load_file(pipes["ft1.sf"])
    assert all(torch.equal(merged[n], first[n]) for n in first if n.startswith("cond_stage_model."))


def test_only_the_folders_model_index_names_are_copied(pipes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    source = tmp_path / "with-extras"
    shutil.copytree(pipes["ft1"], source)
    (source / "samples").mkdir()
    (source / "samples" / "grid.png").write_bytes(b"not a model")
    (source / "unet" / "notes.txt").write_text("kept: a non-weight file of a component")
    recipe = {"merge_method": "linear", "models": [{"model": str(source)}, {"model": str(pipes["ft2"])}]}
    out = merge(parse_recipe(recipe), tmp_path / "out").out
    assert not (out / "samples").exists() and (out / "unet" / "notes.txt").is_file()
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", UNET, "notes.txt"]
