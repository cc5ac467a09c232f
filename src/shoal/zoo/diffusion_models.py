"""The drawing world's networks and how long each trains, per world size.

A pipeline in diffusers' Stable Diffusion layout: a CLIP text encoder over the world's word
tokenizer, a small ``AutoencoderKL`` (32 x 32 RGB images <-> 8 x 8 x 4 latents), a small
``UNet2DConditionModel`` with cross-attention in both of its down and up blocks, and a DDIM
scheduler with trailing timesteps (so that the few-step schedule, 999/499 for two steps, is a
subset of the 20-step one, and distillation can read the teacher's trajectory at the student's
timesteps). diffusers and transformers are imported inside the functions.

FEW_STEPS is 1, SDXL-Turbo's one-step setting. Since version 3 the UNet predicts v at zero
terminal SNR (:func:`new_scheduler`), and with that even 2 steps of the undistilled base draw
about as well as 20 (a prompt that names shape, colour, size and cell leaves little to decide);
one step from pure noise gives the base's mean picture, which is blurred where the prompt leaves
the picture open (the cell of ``"big red apples ."``, the thing's small offsets), so one step is
where a distilled model has something to add. (Versions 1 and 2 predicted epsilon; there 4 steps
drew as well as 20 and 2 were unfinished, so their task was 2 steps.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.errors import ConfigError

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
PROMPT_TOKENS = 8  # <s> + at most six words + one pad
MANY_STEPS = 20
FEW_STEPS = 1


@dataclass(frozen=True)
class Stage:
    """How one model is trained: optimizer steps, batch size, peak learning rate."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 20


@dataclass(frozen=True)
class DrawingSize:
    """Everything that differs between drawing-world sizes."""

    name: str
    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]  # one entry per down (and up) block
    text_hidden: int
    text_layers: int
    vae: Stage
    base: Stage
    lang: Stage
    fast: Stage
    judge: Stage
    latent_pool: int  # how many (image, prompt) pairs are encoded once for training
    distill_pool: int  # how many teacher trajectories the fast specialist learns from
    # lang trains in rounds of `lang` until it draws B prompts of the validation drawings at
    # MANY_STEPS at least lang_check x as well as the base draws their A prompts, at most
    # lang_rounds rounds (1: one round, no check)
    lang_rounds: int = 1
    lang_check: float = 0.9


DRAWING_SIZES: dict[str, DrawingSize] = {
    "micro": DrawingSize(
        "micro", vae_channels=(8, 16, 16), unet_channels=(16, 32, 32), text_hidden=32, text_layers=1,
        vae=Stage(25, 16, 2e-3, 5), base=Stage(25, 16, 2e-3, 5), lang=Stage(10, 16, 1e-3, 5),
        fast=Stage(10, 16, 5e-4, 5), judge=Stage(30, 32, 3e-3, 5),
        latent_pool=256, distill_pool=32),
    "small": DrawingSize(
        "small", vae_channels=(16, 32, 32), unet_channels=(32, 64, 64), text_hidden=64, text_layers=2,
        vae=Stage(400, 32, 2e-3), base=Stage(1800, 32, 1e-3, 50), lang=Stage(900, 32, 1e-3),
        fast=Stage(300, 32, 2e-4), judge=Stage(500, 64, 3e-3),
        latent_pool=3840, distill_pool=768, lang_rounds=3, lang_check=0.9),
}


def get_drawing_size(name: str) -> DrawingSize:
    """The drawing-world size ``name``. Unknown name: ConfigError listing the known ones."""
    size = DRAWING_SIZES.get(name)
    if size is None:
        raise ConfigError(f"unknown drawing-world size {name!r}; known: {', '.join(DRAWING_SIZES)}")
    return size


def drawing_tokenizer() -> Any:
    """The world's word tokenizer set up for a text encoder: right padding to PROMPT_TOKENS."""
    from shoal.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = PROMPT_TOKENS
    return tokenizer


def new_text_encoder(size: DrawingSize, tokenizer: Any) -> Any:
    """A fresh ``CLIPTextModel`` over the tokenizer's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=size.text_hidden,
        intermediate_size=4 * size.text_hidden, num_hidden_layers=size.text_layers,
        num_attention_heads=4, max_position_embeddings=PROMPT_TOKENS,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, projection_dim=size.text_hidden)
    return CLIPTextModel(config)


def new_vae(size: DrawingSize) -> Any:
    """A fresh ``AutoencoderKL``: 32 x 32 x 3 <-> 8 x 8 x LATENT_CHANNELS."""
    from diffusers import AutoencoderKL

    blocks = len(size.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=size.vae_channels,
        layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
        sample_size=IMAGE_SIZE)


def new_unet(size: DrawingSize) -> Any:
    """A fresh ``UNet2DConditionModel`` over 8 x 8 latents, cross-attending to the prompt."""
    from diffusers import UNet2DConditionModel

    blocks = len(size.unet_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        layers_per_block=1, block_out_channels=size.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * blocks,
        up_block_types=("CrossAttnUpBlock2D",) * blocks,
        cross_attention_dim=size.text_hidden, attention_head_dim=8,
        norm_num_groups=8)


def new_scheduler(*, v_prediction: bool = True) -> Any:
    """DDIM over Stable Diffusion's betas, trailing timesteps, final alpha 1 (eta 0).

    ``v_prediction`` (the drawing world since version 3): the betas rescaled to zero terminal
    SNR and the UNet predicting v (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed"). With Stable Diffusion's own schedule (``False``: epsilon, the
    last training step keeps sqrt(alpha-bar) = .068 of the image) the low frequencies of the
    image leak into the most-noised latents, so the models learn to put the thing where the
    starting noise happens to be brightest and never learn the cell the prompt names (v2:
    the judge read the named cell at chance); from pure noise at zero SNR only the prompt
    can say where.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=True, steps_offset=1, timestep_spacing="trailing",
                         prediction_type="v_prediction" if v_prediction else "epsilon",
                         rescale_betas_zero_snr=v_prediction)


def assemble_pipeline(*, unet: Any, text_encoder: Any, vae: Any, tokenizer: Any,
                      scheduler: Any) -> Any:
    """The components as a ``StableDiffusionPipeline`` (no safety checker), progress bars off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
