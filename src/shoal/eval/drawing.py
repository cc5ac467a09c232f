"""Fitness for text-to-image models: prompts -> images (fixed noise per prompt) -> a judge's reading.

An image *hits* when the judge reads every attribute the prompt asks for (shape, colour, size,
cell, ...); a target class below 0 means the prompt leaves that attribute open. The noise each prompt starts from is a function of its noise seed only, so every
model draws a prompt from the same starting point and scores are paired across models.

One safe image cannot win: besides the hit rate, the score counts how many *distinct*
readings the images have, relative to how many distinct targets the prompts ask for
(``diversity``); ``fitness = accuracy * min(1, 2 * diversity)``, so a model whose images
collapse onto few readings loses in proportion, while a model that hits at least half of the
targets is never penalized (its hits alone are that diverse).

The pipeline is any diffusers text-to-image pipeline called as ``pipe(prompt=[...],
latents=..., num_inference_steps=..., guidance_scale=..., output_type="pt")``; the judge is a
callable ``images (n, 3, H, W) in [0, 1] -> {attribute: class indices (n,)}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from shoal.errors import ShoalError
from shoal.eval.scoring import mean_stderr

ReadFn = Callable[[torch.Tensor], Mapping[str, np.ndarray]]


class DrawingTaskError(ShoalError):
    """A drawing task or its targets do not fit together (lengths, attributes)."""


@dataclass(frozen=True)
class DrawingTask:
    """Prompts, the noise seed of each, and the class index per attribute each one asks for."""

    name: str
    prompts: tuple[str, ...]
    noise_seeds: tuple[int, ...]
    targets: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.noise_seeds) != n or any(len(v) != n for v in self.targets.values()):
            raise DrawingTaskError(f"drawing task {self.name!r}: {n} prompts but "
                                   f"{len(self.noise_seeds)} noise seeds and target lengths "
                                   f"{ {k: len(v) for k, v in self.targets.items()} }")
        if not self.targets:
            raise DrawingTaskError(f"drawing task {self.name!r} has no target attributes")


@dataclass(frozen=True)
class DrawingScore:
    """What a model scored on a drawing task."""

    accuracy: float
    stderr: float
    diversity: float
    fitness: float
    n: int
    hits: tuple[float, ...]
    per_attribute: Mapping[str, float]


def prompt_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Starting latents ``(n, *shape)``: row i is drawn from a generator seeded with seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


def latent_shape(pipe: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the pipeline's UNet input at its native sample size."""
    config = pipe.unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.in_channels), int(height), int(width)


@torch.no_grad()
def draw(pipe: Any, prompts: Sequence[str], noise_seeds: Sequence[int], *, steps: int,
         guidance_scale: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """The pipeline's images ``(n, 3, H, W)`` in [0, 1] for ``prompts``, in order, in batches;
    prompt i starts from :func:`prompt_noise` of ``noise_seeds[i]``."""
    if len(prompts) != len(noise_seeds):
        raise DrawingTaskError(f"{len(prompts)} prompts but {len(noise_seeds)} noise seeds")
    if steps < 1:
        raise DrawingTaskError(f"steps must be at least 1, got {steps}")
    shape = latent_shape(pipe)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        latents = prompt_noise(noise_seeds[start:start + batch_size], shape)
        out = pipe(prompt=batch, latents=latents, num_inference_steps=steps,
                   guidance_scale=guidance_scale, output_type="pt")
        chunks.append(out.images.float().clamp(0, 1).cpu())
    if not chunks:
        return torch.zeros((0, 3, 0, 0))
    return torch.cat(chunks)


def judge_images(images: torch.Tensor, task: DrawingTask, read: ReadFn) -> DrawingScore:
    """Score ``images`` (row i drawn for ``task.prompts[i]``) with the judge ``read``."""
    n = len(task.prompts)
    if images.shape[0] != n:
        raise DrawingTaskError(f"drawing task {task.name!r}: {n} prompts but {images.shape[0]} images")
    reading = read(images)
    missing = [k for k in task.targets if k not in reading]
    if missing:
        raise DrawingTaskError(f"the judge does not read {', '.join(missing)}")
    hits_per = {k: (np.asarray(v) < 0) | (np.asarray(reading[k])[:n] == np.asarray(v))
                for k, v in task.targets.items()}
    hit = np.logical_and.reduce(list(hits_per.values())).astype(np.float64)
    read_rows = set(zip(*(np.asarray(reading[k]).tolist() for k in task.targets)))
    target_rows = set(zip(*(tuple(v) for v in task.targets.values())))
    diversity = len(read_rows) / max(1, len(target_rows)) if n else 0.0
    accuracy = float(hit.mean()) if n else 0.0
    return DrawingScore(
        accuracy=accuracy, stderr=mean_stderr(hit.tolist()), diversity=min(1.0, diversity),
        fitness=accuracy * min(1.0, 2.0 * diversity), n=n, hits=tuple(hit.tolist()),
        per_attribute={k: float(v.mean()) if n else 0.0 for k, v in hits_per.items()})


def score_drawing(pipe: Any, task: DrawingTask, read: ReadFn, *, steps: int,
                  guidance_scale: float = 1.0, batch_size: int = 64) -> DrawingScore:
    """Draw every prompt of ``task`` with ``pipe`` at ``steps`` steps and judge the images."""
    images = draw(pipe, task.prompts, task.noise_seeds, steps=steps,
                  guidance_scale=guidance_scale, batch_size=batch_size)
    return judge_images(images, task, read)
