"""Build (or find in the cache) the vision-language world of a size and seed.

The VLM world is made from the finished language world of the same size and seed (built
first when missing) and lives in its own folder, so the language world stays as it was::

    <root>/manifest.json     written last: a folder without it is not a world
    <root>/vlm/              a LLaVA folder (LlavaForConditionalGeneration + LlavaProcessor)

``root`` defaults to ``$SHOAL_CACHE/zoo/<size>-seed<seed>-vlm-v<version>``. The VLM's
language model starts as the language world's ``base`` and is trained on saying what a picture
shows in both languages (``look_a``, ``look_b``) and on stories about pictures in language A
(``vqa_a``), with replay of the base's pretraining text, until held-out checks of those tasks
pass (:func:`shoal.zoo.vlm_train.train_vlm`); no model trains on stories about
pictures in B (``vqa_b``, the cross task). Like :func:`shoal.zoo.build.build_zoo`, the world is built in a
staging folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.progress import ProgressFn, no_progress
from shoal.zoo.errors import ZooError
from shoal.zoo.references import MANIFEST, VLM_MODEL

# 2: answers in the stories' own `N obj` (no colour), the object named in the story's change,
#    and training until held-out checks pass (version 1: `N colour obj`, a fixed 800 steps).
VLM_WORLD_VERSION = 2
TRAINED_TASKS = ("look_a", "look_b", "vqa_a")
# Shares of the VLM's training examples taken from each trained task (the stories name the
# object, so only the look tasks teach the vision tower to tell kinds apart).
TASK_SHARES = {"look_a": 0.3, "look_b": 0.3, "vqa_a": 0.4}
MAX_TRAINING_EXAMPLES = 6000


@dataclass(frozen=True)
class VlmWorld:
    """A finished VLM world on disk, with the language world it was made from."""

    root: Path
    size: str
    seed: int
    language_world: Path
    models: tuple[str, ...] = (VLM_MODEL,)
    tasks: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()

    def model(self, name: str) -> Path:
        """The folder of ``vlm``, or of a model of the language world (``base``, ``lang``...)."""
        if name in self.models:
            return self.root / name
        folder = self.language_world / name
        if not (folder / "config.json").is_file():
            raise ZooError(f"VLM world {self.root} has no model {name!r}; models: "
                           f"{', '.join(self.models)} (and the language world's)")
        return folder

    def task(self, name: str):
        """The image task ``name`` with this world's seed."""
        from shoal.zoo.vision_tasks import get_image_task

        return get_image_task(name, self.seed)


def default_vlm_root(size: str, seed: int) -> Path:
    """``$SHOAL_CACHE/zoo/<size>-seed<seed>-vlm-v<version>``, else under ``~/.cache/shoal``."""
    from shoal.zoo.build import cache_folder

    return cache_folder(f"{size}-seed{seed}-vlm-v{VLM_WORLD_VERSION}")


def _world(root: Path, manifest: dict) -> VlmWorld:
    return VlmWorld(root=root, size=manifest["size"], seed=manifest["seed"],
                    language_world=Path(manifest["language_world"]),
                    models=tuple(manifest["models"]), tasks=tuple(manifest["tasks"]),
                    held_out=tuple(manifest["held_out"]))


def load_vlm_world(size: str = "small", seed: int = 0, *, root: Path | None = None) -> VlmWorld | None:
    """The finished VLM world of this size and seed, or None when it has not been built."""
    from shoal.zoo.build import read_manifest

    root = Path(root) if root is not None else default_vlm_root(size, seed)
    manifest = read_manifest(root)
    if (manifest is None or manifest.get("kind") != "vlm"
            or manifest.get("world_version") != VLM_WORLD_VERSION
            or manifest.get("size") != size or manifest.get("seed") != seed):
        return None
    return _world(root, manifest)


def training_examples(size: str, seed: int) -> list:
    """The image examples the VLM of ``size`` and ``seed`` trains on (with their pictures),
    in a fixed order: a prefix of each trained task's train split."""
    from shoal.zoo.vision_tasks import get_image_task

    examples: list = []
    for name, count in _task_counts(size).items():
        examples.extend(get_image_task(name, seed, train_size=count).examples("train"))
    return examples


def _task_counts(size: str) -> dict[str, int]:
    from shoal.zoo.sizes import get_vlm_size

    settings = get_vlm_size(size).train
    total = min(MAX_TRAINING_EXAMPLES, settings.steps * settings.batch_size)
    return {name: round(total * TASK_SHARES[name]) for name in TRAINED_TASKS}


def check_examples(size: str, seed: int) -> dict[str, list]:
    """The unseen examples the VLM's training checks, by task: the next ``check_size``
    examples of each trained task's train split after those it trains on (so none is trained
    on, and none is in an evaluation split)."""
    from shoal.zoo.sizes import get_vlm_size
    from shoal.zoo.vision_tasks import get_image_task

    size_of_check = get_vlm_size(size).train.check_size
    checks = {}
    for name, count in _task_counts(size).items():
        task = get_image_task(name, seed, train_size=count + size_of_check)
        checks[name] = list(task.examples("train")[count:])
    return checks


def build_vlm_world(size: str = "small", *, out: Path | None = None, seed: int = 0,
                    force: bool = False, language_world: Path | None = None,
                    progress: ProgressFn | None = None, threads: int | None = 1) -> VlmWorld:
    """Build the VLM world ``size`` for ``seed`` (or return the cached one).

    ``language_world`` is the folder of the language world to start from (default: the cached
    one of this size and seed, built when missing). ``threads`` as in
    :func:`shoal.zoo.build.build_zoo`: weights are bitwise reproducible for the same seed and
    thread count.
    """
    from shoal.zoo.build import _deterministic, build_zoo, check_target, load_zoo, staged_world
    from shoal.zoo.sizes import get_vlm_size

    spec = get_vlm_size(size)
    root = Path(out) if out is not None else default_vlm_root(size, seed)
    if not force:
        cached = load_vlm_world(size, seed, root=root)
        if cached is not None:
            return cached
    check_target(root, force)
    report = progress or no_progress
    if language_world is not None:
        words = load_zoo(size, seed, root=Path(language_world))
        if words is None:
            raise ZooError(f"{language_world} is not a finished {size} language world of seed {seed}")
    else:
        words = build_zoo(size, seed=seed, progress=report, threads=threads)
    started = time.monotonic()
    with staged_world(root, force) as staging:
        with _deterministic(threads) as used_threads:
            run = _train(words.model("base"), spec, size, seed, staging / VLM_MODEL, report)
        from shoal.zoo.vision_tasks import IMAGE_TASKS

        manifest = {
            "world_version": VLM_WORLD_VERSION, "kind": "vlm", "size": size, "seed": seed,
            "language_world": str(words.root), "models": [VLM_MODEL], "tasks": list(IMAGE_TASKS),
            "trained_on": list(TRAINED_TASKS),
            "held_out": [name for name, t in IMAGE_TASKS.items() if t.held_out],
            "threads": used_threads, "build_seconds": round(time.monotonic() - started, 1),
            "final_train_loss": {VLM_MODEL: round(sum(run.losses[-20:]) / len(run.losses[-20:]), 4)},
            "training": {VLM_MODEL: {"steps": run.steps, "cooldown_from": run.cooldown_from,
                                     "target": spec.train.target,
                                     "target_reached": run.target_reached, "checks": run.checks}},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return _world(root, manifest)


def _train(base_folder: Path, spec, size: str, seed: int, folder: Path,
           report: ProgressFn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoal.zoo.build import _save
    from shoal.zoo.corpus import documents, pretraining_mix
    from shoal.zoo.vlm_train import new_processor, new_vlm, train_vlm

    base = AutoModelForCausalLM.from_pretrained(base_folder)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    model = new_vlm(base, spec.vision, seed=seed)
    processor = new_processor(tokenizer, spec.vision)
    report("draw pictures", 0, 1)
    examples = training_examples(size, seed)
    report("draw pictures", 1, 1)
    replay = documents(pretraining_mix(), random.Random(f"vlm-replay:{seed}"))
    run = train_vlm(model, processor, examples, replay, spec.train, spec.vision, seed=seed,
                    checks=check_examples(size, seed), progress=report)
    _save(model, processor, folder)
    return run
