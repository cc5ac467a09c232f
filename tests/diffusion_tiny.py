"""Tiny Stable-Diffusion-shaped pipelines built locally (never downloaded), for checkpoint and merge tests.

``build_tiny_pipeline`` saves a diffusers folder (UNet, CLIP text encoder, VAE, scheduler, a CLIP
tokenizer over a made-up vocabulary); ``to_single_file`` writes the same weights as one
web-UI-style ``.safetensors`` (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). The diffusers -> original name mapping is written here from
the SD 1.x layout, independently of shoal's reader and of diffusers' (reverse) converter.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# Two down blocks (cross-attention, plain) and one resnet per block: IN00..IN05, M00, OUT00..OUT05.
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=8, norm_num_groups=8)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=8, sample_size=16)
TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=16, projection_dim=32)


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer over single letters (no merges): enough to encode any lowercase prompt."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                  model_max_length=TEXT_CONFIG["max_position_embeddings"]).save_pretrained(folder)


def build_tiny_pipeline(out: Path, seed: int = 0, *, base: Path | None = None, noise: float = 0.02) -> Path:
    """Save a tiny text-to-image pipeline to ``out``; with ``base``, its weights plus noise (a fine-tune)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    if base is not None:
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in (pipe.unet, pipe.text_encoder, pipe.vae):
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * noise)
    else:
        tokenizer_dir = out.parent / f".{out.name}-tokenizer"
        write_tokenizer(tokenizer_dir)
        text_config = CLIPTextConfig(vocab_size=len(json.loads((tokenizer_dir / "vocab.json").read_text())),
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1, **TEXT_CONFIG)
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**UNET_CONFIG), vae=AutoencoderKL(**VAE_CONFIG),
            text_encoder=CLIPTextModel(text_config), tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
            scheduler=DDIMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def generate(pipe, steps: int = 2, seed: int = 0) -> torch.Tensor:
    """A 1-2 step image as a float tensor (B, H, W, C)."""
    result = pipe("a red ball", num_inference_steps=steps, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(seed), guidance_scale=1.0)
    return torch.as_tensor(result.images)


# -- diffusers names -> the original (LDM / web UI) names, SD 1.x layout ------------------------------

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = [("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]


def unet_original_name(name: str, layers: int, attention_up: set[int]) -> str:
    """The LDM name of a diffusers UNet tensor (``layers`` resnets per down block)."""
    for new, old in _UNET_TOP:
        if name.startswith(new):
            return old + name[len(new):]
    parts = name.split(".")
    kind, block = parts[0], int(parts[1]) if parts[1].isdigit() else None
    rest = ".".join(parts[4:]) if len(parts) > 4 else ""
    if kind == "down_blocks":
        sub, j = parts[2], int(parts[3])
        if sub == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
        index = 1 + block * (layers + 1) + j
        return f"input_blocks.{index}.{0 if sub == 'resnets' else 1}." + _resnet(sub, rest)
    if kind == "up_blocks":
        sub, j = parts[2], int(parts[3])
        if sub == "upsamplers":
            at = 2 if block in attention_up else 1
            return f"output_blocks.{block * (layers + 1) + layers}.{at}." + ".".join(parts[4:])
        index = block * (layers + 1) + j
        return f"output_blocks.{index}.{0 if sub == 'resnets' else 1}." + _resnet(sub, rest)
    if kind == "mid_block":
        sub, j = parts[1], int(parts[2])
        rest = ".".join(parts[3:])
        return f"middle_block.{1 if sub == 'attentions' else 2 * j}." + _resnet(sub, rest)
    raise KeyError(name)


def _resnet(sub: str, rest: str) -> str:
    if sub != "resnets":
        return rest
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_original_name(name: str, blocks: int) -> str:
    """The LDM name of a diffusers AutoencoderKL tensor (``blocks`` down/up blocks)."""
    name = name.replace("conv_norm_out", "norm_out")
    parts = name.split(".")
    if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
        block = int(parts[2])
        where = "down" if parts[1] == "down_blocks" else "up"
        if where == "up":
            block = blocks - 1 - block
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{parts[0]}.{where}.{block}.{where}sample." + ".".join(parts[5:])
        rest = ".".join(parts[5:])
        for new, old in _VAE_RESNET:
            rest = rest.replace(new, old)
        return f"{parts[0]}.{where}.{block}.block.{parts[4]}.{rest}"
    if parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
        rest = ".".join(parts[4:])
        if parts[2] == "resnets":
            return f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        for new, old in _VAE_ATTN:
            if rest.startswith(new + "."):
                return f"{parts[0]}.mid.attn_1.{old}{rest[len(new):]}"
    return name


def to_single_file(folder: Path, out: Path) -> Path:
    """Write the pipeline at ``folder`` as one SD 1.x web-UI checkpoint ``out``."""
    from safetensors.torch import load_file, save_file

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    layers = unet_config["layers_per_block"]
    attention_up = {i for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind}
    vae_blocks = len(json.loads((folder / "vae" / "config.json").read_text())["down_block_types"])
    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        tensors["model.diffusion_model." + unet_original_name(name, layers, attention_up)] = t
    for name, t in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        old = vae_original_name(name, vae_blocks)
        if ".mid.attn_1." in old and old.endswith("weight") and t.dim() == 2:
            t = t[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        tensors["first_stage_model." + old] = t
    for name, t in load_file(folder / "text_encoder" / "model.safetensors").items():
        inner = name if name.startswith("text_model.") else "text_model." + name  # as SD 1.x files have it
        tensors["cond_stage_model.transformer." + inner] = t
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out


SDXL_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                        norm_num_groups=8)


def build_tiny_sdxl(out: Path, seed: int = 0, *, base: Path | None = None, noise: float = 0.02) -> Path:
    """A tiny SDXL-shaped pipeline (two text encoders, a text-time UNet); with ``base``, a fine-tune of it."""
    from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    if base is not None:
        pipe = DiffusionPipeline.from_pretrained(base)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * noise)
    else:
        tokenizer_dir = out.parent / f".{out.name}-tokenizer"
        write_tokenizer(tokenizer_dir)
        vocab = len(json.loads((tokenizer_dir / "vocab.json").read_text()))
        text_config = CLIPTextConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1, **TEXT_CONFIG)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        pipe = StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**SDXL_UNET_CONFIG), vae=AutoencoderKL(**VAE_CONFIG),
            text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer, tokenizer_2=tokenizer,
            scheduler=EulerDiscreteScheduler(num_train_timesteps=100, steps_offset=1))
    pipe.save_pretrained(out)
    return out
