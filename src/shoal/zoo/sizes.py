"""World sizes: the model shape and how long each model trains.

``micro`` is for tests: the same pipeline, trained for seconds, not good at anything.
``small`` is the demonstration world (1.1M-parameter Llamas): built in about seven minutes
with one thread on a shared 2-core machine, with the score matrix described in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import ConfigError
from shoal.zoo.train import TrainingSettings


@dataclass(frozen=True)
class ModelShape:
    """A Llama configuration, small enough for a CPU."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = 128


@dataclass(frozen=True)
class WorldSize:
    """Everything that differs between world sizes."""

    name: str
    shape: ModelShape
    base: TrainingSettings
    specialist: TrainingSettings


SIZES: dict[str, WorldSize] = {
    "micro": WorldSize(
        "micro",
        ModelShape(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        base=TrainingSettings(steps=60, batch_size=16, seq_len=64, lr=3e-3, warmup=10),
        specialist=TrainingSettings(steps=15, batch_size=16, seq_len=64, lr=1e-3, warmup=5),
    ),
    "small": WorldSize(
        "small",
        ModelShape(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
        base=TrainingSettings(steps=1000, batch_size=32, seq_len=64, lr=3e-3, warmup=50),
        specialist=TrainingSettings(steps=200, batch_size=32, seq_len=64, lr=1e-3, warmup=20),
    ),
}


def get_size(name: str) -> WorldSize:
    """The world size called ``name``. Unknown name: ConfigError listing the known ones."""
    size = SIZES.get(name)
    if size is None:
        raise ConfigError(f"unknown zoo size {name!r}; known: {', '.join(SIZES)}")
    return size


@dataclass(frozen=True)
class VisionShape:
    """A CLIP vision tower: ``image_size`` pixels square, cut into ``patch_size`` patches."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int = 32
    patch_size: int = 8


@dataclass(frozen=True)
class VlmTrainingSettings:
    """How the VLM is trained: at most ``steps`` of ``batch_size`` image examples plus
    ``replay_rows`` packed rows of the base's pretraining text; the vision tower and projector
    (new) learn at ``vision_lr``, the language model (the world's base) at ``language_lr``.
    After ``warmup`` the rates stay constant; every ``check_every`` steps the answers of
    ``check_size`` unseen examples per trained task are checked (teacher-forced, every answer
    token right), and once each task reaches ``target`` (or ``steps - cooldown`` steps have run)
    the rates fall linearly to a tenth over ``cooldown`` steps and training stops."""

    steps: int
    batch_size: int
    replay_rows: int
    vision_lr: float
    language_lr: float
    warmup: int = 20
    seq_len: int = 64
    weight_decay: float = 0.01
    check_every: int = 100
    check_size: int = 64
    target: float = 0.98
    cooldown: int = 100


@dataclass(frozen=True)
class VlmSize:
    """What the vision-language world of a size adds to the language world of that size."""

    name: str
    vision: VisionShape
    train: VlmTrainingSettings


VLM_SIZES: dict[str, VlmSize] = {
    "micro": VlmSize("micro", VisionShape(hidden_size=32, intermediate_size=64, num_layers=1,
                                          num_heads=2),
                     VlmTrainingSettings(steps=30, batch_size=16, replay_rows=4, vision_lr=3e-3,
                                         language_lr=1e-3, warmup=5, check_every=10,
                                         check_size=8, cooldown=10)),
    "small": VlmSize("small", VisionShape(hidden_size=64, intermediate_size=256, num_layers=2,
                                          num_heads=4),
                     VlmTrainingSettings(steps=3000, batch_size=32, replay_rows=8, vision_lr=2e-3,
                                         language_lr=3e-4, warmup=40, check_every=100,
                                         check_size=100, target=0.97, cooldown=150)),
}


def get_vlm_size(name: str) -> VlmSize:
    """The VLM world size called ``name``. Unknown name: ConfigError listing the known ones."""
    size = VLM_SIZES.get(name)
    if size is None:
        raise ConfigError(f"unknown zoo size {name!r} for a VLM world; known: {', '.join(VLM_SIZES)}")
    return size
