"""Diffusion checkpoints: pipeline folders and single files read as COMPONENT/NAME, and the UNet block table.

The block numbering is checked against tables written here by hand from the SD 1.x / SDXL layouts
(the numbering of merge-block-weighted and supermerger), not derived from shoal's rules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_tiny import build_tiny_pipeline, to_single_file, unet_original_name
from shoal.checkpoint import open_checkpoint
from shoal.checkpoint.diffusion import DiffusionCheckpoint, split_components
from shoal.checkpoint.unet import is_block_name, unet_block_map, unet_block_of, unet_blocks
from shoal.errors import CheckpointError, ShoalError

# SD 1.x, diffusers names -> block, one row per kind of place (written from the SD 1.x layout:
# 4 down blocks of 2 resnets (+ attention in the first three) and a downsampler but the last one;
# 4 up blocks of 3 (+ attention but the first) and an upsampler but the last one).
SD1_DIFFUSERS = {
    "conv_in.weight": "IN00",
    "time_embedding.linear_1.weight": None,
    "down_blocks.0.resnets.0.conv1.weight": "IN01",
    "down_blocks.0.attentions.0.proj_in.weight": "IN01",
    "down_blocks.0.resnets.1.conv1.weight": "IN02",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight": "IN02",
    "down_blocks.0.downsamplers.0.conv.weight": "IN03",
    "down_blocks.1.resnets.0.conv1.weight": "IN04",
    "down_blocks.1.attentions.1.proj_out.weight": "IN05",
    "down_blocks.1.downsamplers.0.conv.weight": "IN06",
    "down_blocks.2.resnets.0.conv_shortcut.weight": "IN07",
    "down_blocks.2.attentions.1.norm.weight": "IN08",
    "down_blocks.2.downsamplers.0.conv.weight": "IN09",
    "down_blocks.3.resnets.0.conv1.weight": "IN10",
    "down_blocks.3.resnets.1.conv2.weight": "IN11",
    "mid_block.resnets.0.conv1.weight": "M00",
    "mid_block.attentions.0.proj_in.weight": "M00",
    "mid_block.resnets.1.conv2.weight": "M00",
    "up_blocks.0.resnets.0.conv1.weight": "OUT00",
    "up_blocks.0.resnets.1.conv1.weight": "OUT01",
    "up_blocks.0.resnets.2.conv1.weight": "OUT02",
    "up_blocks.0.upsamplers.0.conv.weight": "OUT02",
    "up_blocks.1.resnets.0.conv1.weight": "OUT03",
    "up_blocks.1.attentions.0.proj_in.weight": "OUT03",
    "up_blocks.1.attentions.2.proj_out.weight": "OUT05",
    "up_blocks.1.upsamplers.0.conv.weight": "OUT05",
    "up_blocks.2.resnets.1.conv1.weight": "OUT07",
    "up_blocks.3.resnets.0.conv1.weight": "OUT09",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight": "OUT11",
    "conv_norm_out.weight": "OUT11",
    "conv_out.weight": "OUT11",
}
# SD 1.x original names of the same places (the pairs of diffusers' SD 1.x conversion table)
SD1_ORIGINAL = {
    "input_blocks.0.0.weight": "IN00",
    "time_embed.0.weight": None,
    "input_blocks.1.0.in_layers.2.weight": "IN01",
    "input_blocks.1.1.proj_in.weight": "IN01",
    "input_blocks.3.0.op.weight": "IN03",
    "input_blocks.4.1.proj_out.weight": "IN04",
    "input_blocks.9.0.op.weight": "IN09",
    "input_blocks.11.0.out_layers.3.weight": "IN11",
    "middle_block.1.proj_in.weight": "M00",
    "middle_block.2.in_layers.2.weight": "M00",
    "output_blocks.0.0.in_layers.2.weight": "OUT00",
    "output_blocks.2.1.conv.weight": "OUT02",
    "output_blocks.5.2.conv.weight": "OUT05",
    "output_blocks.11.1.proj_out.weight": "OUT11",
    "out.0.weight": "OUT11",
    "out.2.weight": "OUT11",
}
SD1_BLOCKS = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SDXL_BLOCKS = [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]


def sd1_diffusers_names() -> list[str]:
    names = ["conv_in.weight", "time_embedding.linear_1.weight", "conv_norm_out.weight", "conv_out.weight"]
    for b in range(4):
        for j in range(2):
            names.append(f"down_blocks.{b}.resnets.{j}.conv1.weight")
            if b < 3:
                names.append(f"down_blocks.{b}.attentions.{j}.proj_in.weight")
        if b < 3:
            names.append(f"down_blocks.{b}.downsamplers.0.conv.weight")
        for j in range(3):
            names.append(f"up_blocks.{b}.resnets.{j}.conv1.weight")
            if b > 0:
                names.append(f"up_blocks.{b}.attentions.{j}.proj_in.weight")
        if b < 3:
            names.append(f"up_blocks.{b}.upsamplers.0.conv.weight")
    names += ["mid_block.resnets.0.conv1.weight", "mid_block.attentions.0.proj_in.weight"]
    return names


def test_sd1_blocks_of_diffusers_names_match_the_table() -> None:
    names = ["unet/" + n for n in sd1_diffusers_names() + list(SD1_DIFFUSERS)]
    names += ["text_encoder/text_model.encoder.layers.0.mlp.fc1.weight", "vae/encoder.down_blocks.0.resnets.0.conv1.weight"]
    found = unet_block_map(names)
    for inner, block in SD1_DIFFUSERS.items():
        assert found.get("unet/" + inner) == block, inner
    assert unet_blocks(names) == SD1_BLOCKS
    assert not any(n.startswith(("text_encoder/", "vae/")) for n in found)  # other components: no block
    assert unet_block_of("unet/down_blocks.1.downsamplers.0.conv.weight", names) == "IN06"
    assert unet_block_of("text_encoder/text_model.encoder.layers.0.mlp.fc1.weight", names) is None


def test_sd1_blocks_of_single_file_names_match_the_table() -> None:
    names = ["model.diffusion_model." + n for n in SD1_ORIGINAL]
    names += [f"model.diffusion_model.input_blocks.{i}.0.in_layers.2.weight" for i in range(12)]
    names += [f"model.diffusion_model.output_blocks.{i}.0.in_layers.2.weight" for i in range(12)]
    found = unet_block_map(names + ["first_stage_model.encoder.down.0.block.0.conv1.weight"])
    for inner, block in SD1_ORIGINAL.items():
        assert found.get("model.diffusion_model." + inner) == block, inner
    assert unet_blocks(names) == SD1_BLOCKS
    assert unet_blocks(["unet/" + n.removeprefix("model.diffusion_model.") for n in names]) == SD1_BLOCKS


def test_sdxl_has_nine_input_and_nine_output_blocks() -> None:
    names = ["unet/conv_in.weight", "unet/conv_out.weight", "unet/add_embedding.linear_1.weight",
             "unet/mid_block.resnets.0.conv1.weight"]
    for b in range(3):
        for j in range(2):
            names.append(f"unet/down_blocks.{b}.resnets.{j}.conv1.weight")
        for j in range(3):
            names.append(f"unet/up_blocks.{b}.resnets.{j}.conv1.weight")
        if b < 2:
            names += [f"unet/down_blocks.{b}.downsamplers.0.conv.weight", f"unet/up_blocks.{b}.upsamplers.0.conv.weight"]
    found = unet_block_map(names)
    assert unet_blocks(names) == SDXL_BLOCKS
    assert found["unet/down_blocks.1.downsamplers.0.conv.weight"] == "IN06"
    assert found["unet/down_blocks.2.resnets.1.conv1.weight"] == "IN08"
    assert found["unet/up_blocks.2.resnets.2.conv1.weight"] == "OUT08"
    assert found["unet/conv_out.weight"] == "OUT08"
    assert "unet/add_embedding.linear_1.weight" not in found
    # the original SDXL file numbers its blocks the same way
    original = [f"model.diffusion_model.input_blocks.{i}.0.weight" for i in range(9)] + \
        [f"model.diffusion_model.output_blocks.{i}.0.weight" for i in range(9)] + \
        ["model.diffusion_model.middle_block.0.weight", "model.diffusion_model.label_emb.0.0.weight"]
    assert unet_blocks(original) == SDXL_BLOCKS


def test_block_names() -> None:
    assert all(is_block_name(b) for b in SD1_BLOCKS)
    assert not any(is_block_name(t) for t in ("IN4", "in04", "M01", "OUT", "unet/"))


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("diffusion-read")
    folder = build_tiny_pipeline(root / "pipe")
    return folder, to_single_file(folder, root / "pipe.safetensors")


def test_folder_reads_every_component_under_its_prefix(tiny_pipeline) -> None:  # type: ignore[no-untyped-def]
    folder, _ = tiny_pipeline
    with open_checkpoint(folder) as reader:
        assert isinstance(reader, DiffusionCheckpoint)
        assert sorted(reader.components) == ["text_encoder", "unet", "vae"]  # tokenizer, scheduler: no weights
        for component, file in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                                ("text_encoder", "model.safetensors")):
            expected = load_file(folder / component / file)
            for name, tensor in expected.items():
                assert torch.equal(reader.get(f"{component}/{name}"), tensor)
        state = {n: reader.get(n) for n in reader.tensor_names()}
    assert sorted(split_components(state)) == ["text_encoder", "unet", "vae"]


def test_single_file_reads_as_the_same_components(tiny_pipeline) -> None:  # type: ignore[no-untyped-def]
    folder, single = tiny_pipeline
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    config = json.loads((folder / "unet" / "config.json").read_text())
    attention_up = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    with open_checkpoint(single) as reader, open_checkpoint(folder) as pipe:
        assert sorted(reader.components) == ["text_encoder", "unet", "vae"]
        assert reader.stored_name("unet/input_blocks.0.0.weight") == "model.diffusion_model.input_blocks.0.0.weight"
        for name, tensor in unet.items():
            original = "unet/" + unet_original_name(name, config["layers_per_block"], attention_up)
            assert torch.equal(reader.get(original), tensor)
        # the blocks agree whichever form names the tensor
        by_folder = unet_block_map(pipe.tensor_names())
        by_file = unet_block_map(reader.tensor_names())
        for name in unet:
            original = "unet/" + unet_original_name(name, config["layers_per_block"], attention_up)
            assert by_folder.get("unet/" + name) == by_file.get(original), name
        assert unet_blocks(pipe.tensor_names()) == ["IN00", "IN01", "IN02", "IN03", "M00",
                                                    "OUT00", "OUT01", "OUT02", "OUT03"]


def test_sharded_and_fp16_variant_components(tiny_pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel

    folder, _ = tiny_pipeline
    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.rmtree(copy / "unet")
    unet.save_pretrained(copy / "unet", max_shard_size="100KB")
    assert (copy / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.half() for k, v in vae.items()}, str(copy / "vae" / "diffusion_pytorch_model.fp16.safetensors"))
    with open_checkpoint(copy) as reader, open_checkpoint(folder) as plain:
        assert reader.tensor_names() and set(reader.tensor_names()) == set(plain.tensor_names())
        name = "unet/up_blocks.1.attentions.0.proj_in.weight"
        assert torch.equal(reader.get(name), plain.get(name))
        assert reader.dtype("vae/decoder.conv_out.weight") == torch.float16


def test_bad_pipelines_are_one_line_errors(tiny_pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, _ = tiny_pipeline
    missing = tmp_path / "missing"
    shutil.copytree(folder, missing)
    shutil.rmtree(missing / "vae")
    with pytest.raises(CheckpointError, match="component 'vae' has no folder"):
        open_checkpoint(missing)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weights"):
        open_checkpoint(pickled)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ShoalError, match="model_index.json"):
        open_checkpoint(broken)


def test_an_sdxl_single_file_has_two_text_encoders(tmp_path: Path) -> None:
    names = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
             "first_stage_model.decoder.conv_out.weight", "denoiser.sigmas"]
    file = tmp_path / "xl.safetensors"
    save_file({n: torch.full((2, 2), float(i)) for i, n in enumerate(names)}, str(file))
    with open_checkpoint(file) as reader:
        assert sorted(reader.components) == ["other", "text_encoder", "text_encoder_2", "unet", "vae"]
        assert sorted(reader.tensor_names()) == sorted([
            "unet/input_blocks.0.0.weight", "unet/label_emb.0.0.weight",
            "text_encoder/transformer.text_model.final_layer_norm.weight",
            "text_encoder_2/model.transformer.resblocks.0.attn.in_proj_weight",
            "vae/decoder.conv_out.weight", "other/denoiser.sigmas"])
        for i, name in enumerate(names):
            outer = next(n for n in reader.tensor_names() if reader.stored_name(n) == name)
            assert torch.equal(reader.get(outer), torch.full((2, 2), float(i)))
    plain = tmp_path / "plain.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, str(plain))
    with open_checkpoint(plain) as reader:
        assert not isinstance(reader, DiffusionCheckpoint)  # a language model's file stays as it is
