"""CPU training loops of the drawing world: the VAE, the denoiser, and few-step distillation.

* VAE: reconstruction (MSE in [-1, 1]) plus a tiny KL term, on freshly rendered drawings;
  afterwards the latent scaling factor is set so that training latents have unit variance.
* Denoiser: the scheduler's prediction type (v at zero terminal SNR since world version 3;
  epsilon, Stable Diffusion's objective, before) on a pool of latents encoded once, the text
  encoder trained with the UNet unless it is frozen (the B specialist's is).
* Distillation to FEW_STEPS: the teacher samples MANY_STEPS DDIM steps from fixed noise; with
  trailing timesteps its trajectory passes through the student's timesteps. The student
  (UNet only; the text encoder stays the teacher's, as in SDXL-Turbo / Lightning) learns, at
  each of its timesteps, the output (epsilon or v) that makes one DDIM step land where the teacher's
  several steps landed: a closed-form regression target per segment, one UNet pass per
  example (progressive distillation's target, taken over a whole segment at once).

Every loop is deterministic for a seed and a thread count. AdamW, linear warm-up, cosine decay
to a tenth of the peak, gradient clipping at 1.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shoal.progress import ProgressFn, no_progress
from shoal.zoo.captions import Drawing, render_drawings
from shoal.zoo.diffusion_models import FEW_STEPS, IMAGE_SIZE, MANY_STEPS, Stage

_KL_WEIGHT = 1e-6


def to_model_images(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, H, W, 3)`` -> float ``(n, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_factor(step: int, stage: Stage) -> float:
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(params: list[torch.nn.Parameter], stage: Stage):
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                  foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, stage))
    return optimizer, schedule


def _step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, schedule) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    return loss.item()


def train_vae(vae: Any, images: torch.Tensor, stage: Stage, *, seed: int,
              progress: ProgressFn | None = None) -> list[float]:
    """Train ``vae`` in place on ``images`` ``(n, 3, H, W)`` in [-1, 1]; then set its
    ``scaling_factor`` to one over the latents' standard deviation. Returns the losses."""
    report = progress or no_progress
    generator = torch.Generator().manual_seed(seed)
    params = list(vae.parameters())
    optimizer, schedule = _optimizer(params, stage)
    losses: list[float] = []
    vae.train()
    report("train vae", 0, stage.steps)
    for step in range(stage.steps):
        batch = images[torch.randint(0, images.shape[0], (stage.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.mode()).sample
        loss = F.mse_loss(recon, batch) + _KL_WEIGHT * posterior.kl().mean()
        losses.append(_step(loss, params, optimizer, schedule))
        report("train vae", step + 1, stage.steps)
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(images[:256]).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return losses


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Scaled latents ``(n, 4, 8, 8)`` of ``images`` ``(n, 3, 32, 32)`` in [-1, 1]."""
    chunks = [vae.encode(images[start:start + batch_size]).latent_dist.mode()
              * vae.config.scaling_factor for start in range(0, images.shape[0], batch_size)]
    return torch.cat(chunks)


def render_pool(drawings: Sequence[Drawing], *, seed: int) -> torch.Tensor:
    """``drawings`` rendered (each nudged at random) as model images ``(n, 3, 32, 32)``."""
    return to_model_images(render_drawings(drawings, random.Random(seed), IMAGE_SIZE))


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(n, PROMPT_TOKENS)`` exactly as the Stable Diffusion pipeline makes them."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _prediction(scheduler: Any) -> str:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"the drawing world trains epsilon or v_prediction, not {kind!r}")
    return kind


def train_denoiser(unet: Any, text_encoder: Any, ids: torch.Tensor, latents: torch.Tensor,
                   scheduler: Any, stage: Stage, *, seed: int, name: str,
                   freeze_text: bool = False, progress: ProgressFn | None = None) -> list[float]:
    """Train ``unet`` (and, unless ``freeze_text``, ``text_encoder``) in place to predict what
    the scheduler's ``prediction_type`` says (the noise, or v = sqrt(a) noise - sqrt(1 - a) x0)
    for ``latents`` noised (row i captioned by ``ids[i]``). Returns the losses."""
    report = progress or no_progress
    generator = torch.Generator().manual_seed(seed)
    kind = _prediction(scheduler)
    params = list(unet.parameters()) + ([] if freeze_text else list(text_encoder.parameters()))
    optimizer, schedule = _optimizer(params, stage)
    alphas = scheduler.alphas_cumprod.float()
    losses: list[float] = []
    unet.train()
    text_encoder.train(not freeze_text)
    report(name, 0, stage.steps)
    for step in range(stage.steps):
        rows = torch.randint(0, latents.shape[0], (stage.batch_size,), generator=generator)
        x0 = latents[rows]  # (B, 4, 8, 8)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, alphas.shape[0], (stage.batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        with torch.set_grad_enabled(not freeze_text):
            hidden = text_encoder(ids[rows]).last_hidden_state  # (B, T, C)
        loss = F.mse_loss(unet(noisy, t, hidden).sample, target)
        losses.append(_step(loss, params, optimizer, schedule))
        report(name, step + 1, stage.steps)
    unet.eval()
    text_encoder.eval()
    return losses


def _alpha(scheduler: Any, t: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[t].float() if t >= 0 else scheduler.final_alpha_cumprod.float()


def ddim_step(x: torch.Tensor, out: torch.Tensor, a_t: torch.Tensor, a_next: torch.Tensor,
              prediction: str = "epsilon") -> torch.Tensor:
    """One deterministic DDIM step (eta 0) from alpha-bar ``a_t`` to ``a_next`` for a model
    output ``out`` of type ``prediction`` ("epsilon" or "v_prediction")."""
    if prediction == "epsilon":
        eps = out
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    else:
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def segment_target(x: torch.Tensor, x_next: torch.Tensor, a_t: torch.Tensor, a_next: torch.Tensor,
                   prediction: str = "epsilon") -> torch.Tensor:
    """The model output (of type ``prediction``) with which one DDIM step from ``x`` at
    alpha-bar ``a_t`` lands exactly on ``x_next`` at ``a_next``: :func:`ddim_step` is linear in
    the output, so this is closed form."""
    if prediction == "epsilon":
        ratio = (a_next / a_t).sqrt()
        return (x_next - ratio * x) / ((1 - a_next).sqrt() - ratio * (1 - a_t).sqrt())
    # x_next = sqrt(a_n) x0 + sqrt(1 - a_n) (x - sqrt(a_t) x0) / sqrt(1 - a_t): solve for x0,
    # then v = (sqrt(a_t) x - x0) / sqrt(1 - a_t). Defined at a_t = 0 (zero terminal SNR).
    c = ((1 - a_next) / (1 - a_t)).sqrt()
    x0 = (x_next - c * x) / (a_next.sqrt() - c * a_t.sqrt())
    return (a_t.sqrt() * x - x0) / (1 - a_t).sqrt()


def student_timesteps(scheduler: Any, steps: int = FEW_STEPS) -> list[int]:
    """The timesteps of a ``steps``-step schedule, then -1 (the final alpha)."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps] + [-1]


@torch.no_grad()
def teacher_states(unet: Any, hidden: torch.Tensor, noise: torch.Tensor, scheduler: Any,
                   *, batch_size: int = 128) -> torch.Tensor:
    """The teacher's MANY_STEPS DDIM trajectory from ``noise``, read at the student's
    timesteps: ``(FEW_STEPS + 1, n, 4, 8, 8)`` (index 0 is the noise, the last the image)."""
    teacher = student_timesteps(scheduler, MANY_STEPS)
    marks = student_timesteps(scheduler, FEW_STEPS)
    if not set(marks) <= set(teacher):
        raise RuntimeError(f"the {MANY_STEPS}-step schedule misses the student's {marks}")
    kind = _prediction(scheduler)
    out = []
    for start in range(0, noise.shape[0], batch_size):
        x = noise[start:start + batch_size]
        h = hidden[start:start + batch_size]
        states = [x]
        for t, t_next in zip(teacher[:-1], teacher[1:]):
            pred = unet(x, torch.full((x.shape[0],), t), h).sample
            x = ddim_step(x, pred, _alpha(scheduler, t), _alpha(scheduler, t_next), kind)
            if t_next in marks:
                states.append(x)
        out.append(torch.stack(states))
    return torch.cat(out, dim=1)


def distill_few_steps(student: Any, hidden: torch.Tensor, states: torch.Tensor, scheduler: Any,
                      stage: Stage, *, seed: int, progress: ProgressFn | None = None
                      ) -> list[float]:
    """Train ``student`` (a UNet) in place so that FEW_STEPS DDIM steps follow the teacher's
    ``states`` (from :func:`teacher_states`) for prompts encoded as ``hidden``."""
    report = progress or no_progress
    generator = torch.Generator().manual_seed(seed)
    marks = student_timesteps(scheduler, FEW_STEPS)
    kind = _prediction(scheduler)
    params = list(student.parameters())
    optimizer, schedule = _optimizer(params, stage)
    losses: list[float] = []
    student.train()
    report("distill fast", 0, stage.steps)
    for step in range(stage.steps):
        rows = torch.randint(0, states.shape[1], (stage.batch_size,), generator=generator)
        segment = torch.randint(0, FEW_STEPS, (stage.batch_size,), generator=generator)
        x = states[segment, rows]
        target_x = states[segment + 1, rows]
        a_t = torch.stack([_alpha(scheduler, marks[k]) for k in segment.tolist()]).view(-1, 1, 1, 1)
        a_n = torch.stack([_alpha(scheduler, marks[k + 1]) for k in segment.tolist()]).view(-1, 1, 1, 1)
        target = segment_target(x, target_x, a_t, a_n, kind)
        t = torch.tensor([marks[k] for k in segment.tolist()])
        loss = F.mse_loss(student(x, t, hidden[rows]).sample, target)
        losses.append(_step(loss, params, optimizer, schedule))
        report("distill fast", step + 1, stage.steps)
    student.eval()
    return losses
