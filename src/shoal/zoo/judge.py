"""The drawing world's judge: a small CNN that reads an image's shape, colour, size and cell.

Trained only on ground-truth renders (nudged at random inside their cells, with a little pixel
noise), never on generated images, so it is an independent reader of what a model drew. It
is stored as ``judge/model.safetensors`` + ``judge/config.json`` in the world's folder.
Its reading of an image is the most likely class of every attribute (:data:`ATTRIBUTES`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.progress import ProgressFn, no_progress
from shoal.zoo.captions import ATTRIBUTES, Drawing, labels_of, render_drawings
from shoal.zoo.diffusion_models import Stage
from shoal.zoo.errors import ZooError

_NOISE = 0.03
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class Judge(nn.Module):
    """Images ``(B, 3, 32, 32)`` in [0, 1] -> logits per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(),  # 16 x 16
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),  # 8 x 8
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),  # 4 x 4
            nn.Flatten(), nn.Linear(32 * width, 4 * width), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(classes))
                                    for name, classes in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.features(images * 2 - 1)
        return {name: head(hidden) for name, head in self.heads.items()}


def _noisy(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (images + _NOISE * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def train_judge(images: torch.Tensor, drawings: Sequence[Drawing], stage: Stage, *, seed: int,
                width: int = 32, progress: ProgressFn | None = None) -> Judge:
    """A judge trained on ``images`` ``(n, 3, 32, 32)`` in [0, 1], row i a render of
    ``drawings[i]`` (a little pixel noise is added to every batch)."""
    if images.shape[0] != len(drawings):
        raise ValueError(f"{images.shape[0]} images but {len(drawings)} drawings")
    report = progress or no_progress
    torch.manual_seed(seed)
    judge = Judge(width)
    generator = torch.Generator().manual_seed(seed)
    labels = {k: torch.from_numpy(v) for k, v in labels_of(drawings).items()}
    optimizer = torch.optim.AdamW(judge.parameters(), lr=stage.lr, weight_decay=0.01,
                                  foreach=False)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=stage.lr,
                                                   total_steps=stage.steps)
    report("train judge", 0, stage.steps)
    judge.train()
    for step in range(stage.steps):
        rows = torch.randint(0, images.shape[0], (stage.batch_size,), generator=generator)
        logits = judge(_noisy(images[rows], generator))
        loss = sum(F.cross_entropy(logits[k], labels[k][rows]) for k in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        report("train judge", step + 1, stage.steps)
    judge.eval()
    return judge


@torch.no_grad()
def read_images(judge: Judge, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The judge's reading of ``images`` ``(n, 3, 32, 32)`` in [0, 1]: class index per attribute."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in ATTRIBUTES}
    for start in range(0, images.shape[0], batch_size):
        logits = judge(images[start:start + batch_size].float())
        for name in ATTRIBUTES:
            out[name].append(logits[name].argmax(-1).numpy())
    return {name: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            for name, parts in out.items()}


def judge_accuracy(judge: Judge, drawings: Sequence[Drawing], *, seed: int) -> dict[str, float]:
    """Accuracy per attribute, and for all attributes at once, on fresh renders of ``drawings``
    (nudged at random with ``seed``)."""
    images = torch.from_numpy(render_drawings(drawings, random.Random(seed))).permute(0, 3, 1, 2)
    images = _noisy(images.float() / 255, torch.Generator().manual_seed(seed))
    reading = read_images(judge, images)
    labels = labels_of(drawings)
    hits = {k: reading[k] == labels[k] for k in ATTRIBUTES}
    result = {k: float(v.mean()) for k, v in hits.items()}
    result["all"] = float(np.logical_and.reduce(list(hits.values())).mean())
    return result


def save_judge(judge: Judge, folder: Path) -> None:
    """Write the judge's weights and config into ``folder`` (created)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({"width": judge.width,
                                             "attributes": list(ATTRIBUTES)}) + "\n")


def load_judge(folder: Path) -> Judge:
    """The judge saved in ``folder``. A missing or damaged judge: ZooError naming the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        judge = Judge(int(config["width"]))
        judge.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ZooError(f"{folder}: not a drawing-world judge ({error})") from error
    judge.eval()
    return judge
