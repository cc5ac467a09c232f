"""Build (or find in the cache) a miniature world: a base model and its specialists.

A world is a folder::

    <root>/manifest.json         written last: a folder without it is not a world
    <root>/base/                 Hugging Face folders (LlamaForCausalLM + tokenizer)
    <root>/math/ lang/ sort/ count/

It is built in a staging folder next to ``root`` and renamed into place when complete, so a
build that is interrupted never leaves something that looks finished.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from shoal.progress import ProgressFn, no_progress
from shoal.zoo.corpus import SPECIALISTS, training_streams
from shoal.zoo.errors import ZooError
from shoal.zoo.references import MANIFEST
from shoal.zoo.sizes import WorldSize, get_size
from shoal.zoo.tasks import ZOO_TASKS, ZooTask, get_zoo_task
from shoal.zoo.tokenizer import build_tokenizer
from shoal.zoo.train import train

WORLD_VERSION = 1


@dataclass(frozen=True)
class ZooWorld:
    """A finished world on disk."""

    root: Path
    size: str
    seed: int
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    specialist_task: dict[str, str] = field(default_factory=dict)
    held_out: tuple[str, ...] = ()

    def model(self, name: str) -> Path:
        """The Hugging Face folder of model ``name`` ("base" or a specialist)."""
        if name not in self.models:
            raise ZooError(f"world {self.root} has no model {name!r}; "
                           f"models: {', '.join(self.models)}")
        return self.root / name

    def task(self, name: str) -> ZooTask:
        """The task ``name`` with this world's seed."""
        return get_zoo_task(name, self.seed)


def cache_folder(name: str) -> Path:
    """``$SHOAL_CACHE/zoo/<name>``, else ``~/.cache/shoal/zoo/<name>``: where every kind of world lives."""
    cache = os.environ.get("SHOAL_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "shoal"
    return base / "zoo" / name


def default_root(size: str, seed: int) -> Path:
    """``$SHOAL_CACHE/zoo/<size>-seed<seed>-v<version>``, else under ``~/.cache/shoal``."""
    return cache_folder(f"{size}-seed{seed}-v{WORLD_VERSION}")


def read_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _world(root: Path, manifest: dict) -> ZooWorld:
    return ZooWorld(root=root, size=manifest["size"], seed=manifest["seed"],
                    models=tuple(manifest["models"]), tasks=tuple(manifest["tasks"]),
                    specialist_task=dict(manifest["specialist_task"]),
                    held_out=tuple(manifest["held_out"]))


def load_zoo(size: str = "small", seed: int = 0, *, root: Path | None = None) -> ZooWorld | None:
    """The finished world of this size and seed, or None when it has not been built."""
    root = Path(root) if root is not None else default_root(size, seed)
    manifest = read_manifest(root)
    if (manifest is None or manifest.get("world_version") != WORLD_VERSION
            or manifest.get("size") != size or manifest.get("seed") != seed):
        return None
    return _world(root, manifest)


@contextmanager
def _deterministic(threads: int | None) -> Iterator[int]:
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def _new_model(size: WorldSize, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = size.shape
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _save(model, tokenizer, folder: Path) -> None:
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the library does not print; progress goes to `report`
    try:
        model.save_pretrained(folder)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_staging(root: Path) -> None:
    """Delete staging folders left by builds whose process is gone (e.g. killed)."""
    for folder in root.parent.glob(f".{root.name}.staging-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def check_target(root: Path, force: bool) -> None:
    """Refuse (before any training) to replace anything but an empty folder or a zoo world."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    if read_manifest(root) is None:
        raise ZooError(f"{root} exists and is not a zoo world; choose another out folder")
    if not force:
        raise ZooError(f"{root} holds another zoo world (other kind, size, seed or version); "
                       f"pass force=True to replace it")


def _prepare_target(root: Path, force: bool) -> None:
    """Make room for the finished world at ``root`` without deleting anything else."""
    check_target(root, force)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    elif root.exists():
        shutil.rmtree(root)


@contextmanager
def staged_world(root: Path, force: bool) -> Iterator[Path]:
    """A fresh staging folder next to ``root`` for a world being built (stale ones of killed builds
    removed first). When the block ends normally the staging folder replaces ``root``; when it
    raises, the staging folder is deleted and ``root`` is left as it was."""
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    staging = root.parent / f".{root.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        _prepare_target(root, force)
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_zoo(size: str = "small", *, out: Path | None = None, seed: int = 0, force: bool = False,
              progress: ProgressFn | None = None, threads: int | None = 1) -> ZooWorld:
    """Build the world ``size`` for ``seed`` (or return the cached one).

    ``out`` is the world's folder (default: :func:`default_root`). A finished world there is
    returned at once unless ``force``. ``threads`` is torch's thread count during the build
    (None: leave torch's setting). Weights are bitwise reproducible for the same seed and
    thread count on the same machine; the default of one thread makes them independent of
    the core count, and on a busy 2-core machine one thread was also much faster than two
    (oversubscribed OpenMP threads).
    """
    spec = get_size(size)
    root = Path(out) if out is not None else default_root(size, seed)
    if not force:
        cached = load_zoo(size, seed, root=root)
        if cached is not None:
            return cached
    check_target(root, force)
    report = progress or no_progress
    started = time.monotonic()
    with staged_world(root, force) as staging:
        with _deterministic(threads) as used_threads:
            tokenizer = build_tokenizer()
            streams = training_streams(seed)
            base = _new_model(spec, tokenizer, seed)
            stream = streams["base"]
            base_losses = train(base, stream, tokenizer, spec.base, seed=seed,
                                stage="pretrain base", progress=report)
            _save(base, tokenizer, staging / "base")
            final_loss = {"base": sum(base_losses[-20:]) / len(base_losses[-20:])}
            for name, task in SPECIALISTS.items():
                model = copy.deepcopy(base)
                torch.manual_seed(seed)
                stream = streams[name]
                losses = train(model, stream, tokenizer, spec.specialist, seed=seed,
                               stage=f"specialist {name} ({task})", progress=report)
                _save(model, tokenizer, staging / name)
                final_loss[name] = sum(losses[-20:]) / len(losses[-20:])
        manifest = {
            "world_version": WORLD_VERSION, "size": size, "seed": seed,
            "models": ["base", *SPECIALISTS], "tasks": list(ZOO_TASKS),
            "specialist_task": dict(SPECIALISTS),
            "held_out": [name for name, t in ZOO_TASKS.items() if t.held_out],
            "threads": used_threads, "build_seconds": round(time.monotonic() - started, 1),
            "final_train_loss": {k: round(v, 4) for k, v in final_loss.items()},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return _world(root, manifest)
