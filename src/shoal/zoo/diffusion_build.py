"""Build (or find in the cache) the drawing world: text-to-image pipelines and their judge.

A drawing world is a folder, separate from the language world's (that one stays as it is)::

    <root>/manifest.json   written last: a folder without it is not a drawing world
    <root>/base/           diffusers StableDiffusionPipeline folders: drawn from language-A
    <root>/lang/           prompts at MANY_STEPS; lang fine-tuned on language-B prompts;
    <root>/fast/           fast distilled to FEW_STEPS (UNet only)
    <root>/judge/          the classifier that reads shapes, colours, sizes and cells

The held-out task is language-B prompts at FEW_STEPS: lang knows B but is slow, fast is fast
but knows no B. Built in a staging folder and renamed into place, as the language world is.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal.progress import ProgressFn, no_progress
from shoal.zoo.build import _deterministic, cache_folder, check_target, read_manifest, staged_world
from shoal.zoo.captions import all_drawings, drawing_splits, drawing_task
from shoal.zoo.diffusion_models import (FEW_STEPS, MANY_STEPS, assemble_pipeline,
                                        drawing_tokenizer, get_drawing_size, new_scheduler,
                                        new_text_encoder, new_unet, new_vae)
from shoal.zoo.diffusion_train import (distill_few_steps, encode_images, prompt_ids, render_pool,
                                       teacher_states, train_denoiser, train_vae)
from shoal.zoo.errors import ZooError
from shoal.zoo.judge import Judge, judge_accuracy, load_judge, save_judge, train_judge
from shoal.zoo.references import MANIFEST

DRAWING_WORLD_VERSION = 5
DRAWING_MODELS = ("base", "lang", "fast")
_REPLAY = 0.25  # share of language-A prompts in the language-B specialist's data


@dataclass(frozen=True)
class DrawingWorld:
    """A finished drawing world on disk."""

    root: Path
    size: str
    seed: int
    manifest: dict

    def model(self, name: str) -> Path:
        """The diffusers pipeline folder of ``name`` (base, lang or fast)."""
        if name not in DRAWING_MODELS:
            raise ZooError(f"drawing world {self.root} has no model {name!r}; "
                           f"models: {', '.join(DRAWING_MODELS)}")
        return self.root / name

    def judge(self) -> Judge:
        """The world's judge, loaded."""
        return load_judge(self.root / "judge")

    def task(self, split: str, language: str, *, copies: int = 1):
        """A :class:`shoal.eval.drawing.DrawingTask` of this world's seed."""
        return drawing_task(self.seed, split, language, copies=copies)


def default_drawing_root(size: str, seed: int) -> Path:
    """``$SHOAL_CACHE/zoo/drawing-<size>-seed<seed>-v<version>``, else under ``~/.cache/shoal``."""
    return cache_folder(f"drawing-{size}-seed{seed}-v{DRAWING_WORLD_VERSION}")


def load_drawing_world(size: str = "small", seed: int = 0, *,
                       root: Path | None = None) -> DrawingWorld | None:
    """The finished drawing world of this size and seed, or None when it is not built."""
    root = Path(root) if root is not None else default_drawing_root(size, seed)
    manifest = read_manifest(root)
    if (manifest is None
            or manifest.get("drawing_world_version") != DRAWING_WORLD_VERSION
            or manifest.get("size") != size or manifest.get("seed") != seed):
        return None
    return DrawingWorld(root=root, size=size, seed=seed, manifest=manifest)


def load_pipeline(folder: Path) -> Any:
    """A drawing-world pipeline folder loaded with ``DiffusionPipeline.from_pretrained``
    (offline), float32, progress bars off.

    The library does not print: progress bars are off during the load, and so are transformers'
    once-per-process notes that diffusers' pipeline imports trigger (the PIL fallback of
    ``CLIPImageProcessor`` where torchvision is absent), and diffusers' FutureWarning about the
    ``torch_dtype`` name (newer versions call it ``dtype``; older ones know only ``torch_dtype``)."""
    import warnings

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    bars = diffusers_logging.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32,
                                                     local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            hf_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_pipeline(folder: Path, **components: Any) -> None:
    from diffusers.utils import logging as diffusers_logging

    pipe = assemble_pipeline(**components)
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(previous)


def _mean_tail(losses: list[float]) -> float:
    tail = losses[-20:] or [float("nan")]
    return round(sum(tail) / len(tail), 4)


def _train_models(spec, seed: int, staging: Path, report: ProgressFn) -> dict:
    tokenizer, scheduler = drawing_tokenizer(), new_scheduler()
    drawings = all_drawings()
    b_train = drawing_splits(seed)["train"]
    pool = [drawings[i % len(drawings)] for i in range(spec.latent_pool)]
    report("render scenes", 0, 1)
    images = render_pool(pool, seed=seed + 1)  # (n, 3, 32, 32) in [-1, 1]
    report("render scenes", 1, 1)
    torch.manual_seed(seed)
    vae = new_vae(spec)
    losses = {"vae": _mean_tail(train_vae(vae, images, spec.vae, seed=seed, progress=report))}
    latents = encode_images(vae, images)
    torch.manual_seed(seed)
    text_encoder, unet = new_text_encoder(spec, tokenizer), new_unet(spec)
    ids = prompt_ids(tokenizer, [d.prompt("a") for d in pool])
    losses["base"] = _mean_tail(train_denoiser(unet, text_encoder, ids, latents, scheduler,
                                               spec.base, seed=seed, name="train base",
                                               progress=report))
    common = {"vae": vae, "tokenizer": tokenizer, "scheduler": scheduler}
    _save_pipeline(staging / "base", unet=unet, text_encoder=text_encoder, **common)

    # B prompts for the train split's drawings only, plus some A prompts as replay. The text
    # encoder stays the base's (frozen): the B words are learnt by the UNet (its cross-attention
    # reads them), where the fast specialist's few-step changes live too, so that a per-block
    # merge has something to weigh (v2 trained both: lang's B knowledge sat in its text encoder
    # and a plain merge of lang's text encoder with fast's UNet left blocks nothing to add).
    train_set = set(b_train)
    b_rows = [i for i, d in enumerate(pool) if d in train_set]
    a_rows = [i for i, d in enumerate(pool) if d not in train_set]
    replay = a_rows[:round(_REPLAY / (1 - _REPLAY) * len(b_rows))]
    rows = b_rows + replay
    lang_prompts = [pool[i].prompt("b") for i in b_rows] + [pool[i].prompt("a") for i in replay]
    lang_ids = prompt_ids(tokenizer, lang_prompts)
    lang_unet, lang_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)

    def lang_round(index: int) -> None:  # round 0, then more while the check fails
        label = "specialist lang (B prompts)" + (f", round {index + 1}" if index else "")
        losses["lang"] = _mean_tail(train_denoiser(
            lang_unet, lang_text, lang_ids, latents[rows], scheduler, spec.lang,
            seed=seed + 2 + index, name=label, freeze_text=True, progress=report))

    lang_round(0)

    distill = [drawings[i % len(drawings)] for i in range(spec.distill_pool)]
    with torch.no_grad():
        hidden = text_encoder(prompt_ids(tokenizer, [d.prompt("a") for d in distill])).last_hidden_state
    noise = torch.randn((spec.distill_pool, *latents.shape[1:]),
                        generator=torch.Generator().manual_seed(seed + 3))
    report("teacher trajectories", 0, 1)
    states = teacher_states(unet, hidden, noise, scheduler)
    report("teacher trajectories", 1, 1)
    fast_unet = copy.deepcopy(unet)
    losses["fast"] = _mean_tail(distill_few_steps(fast_unet, hidden, states, scheduler, spec.fast,
                                                  seed=seed + 3, progress=report))
    _save_pipeline(staging / "fast", unet=fast_unet, text_encoder=text_encoder, **common)

    named = [i for i, d in enumerate(pool) if d.cell >= 0]  # the judge learns cells it can check
    judge = train_judge((images[named] + 1) / 2, [pool[i] for i in named], spec.judge,
                        seed=seed + 4, progress=report)
    save_judge(judge, staging / "judge")
    accuracy = judge_accuracy(judge, [d for d in drawings if d.cell >= 0] * 4, seed=seed + 5)

    # lang's check needs the judge, so it runs last; lang's rounds draw from their own seeds,
    # so a lang that passes after its first round is the one a build without the check makes.
    check = _lang_check(spec, seed, judge, lang_round,
                        base=assemble_pipeline(unet=unet, text_encoder=text_encoder, **common),
                        lang=assemble_pipeline(unet=lang_unet, text_encoder=lang_text, **common),
                        report=report)
    _save_pipeline(staging / "lang", unet=lang_unet, text_encoder=lang_text, **common)
    return {"final_train_loss": losses, "lang_check": check,
            "judge_accuracy_fresh_renders": {k: round(v, 4) for k, v in accuracy.items()}}


def _lang_check(spec, seed: int, judge: Judge, lang_round, *, base: Any, lang: Any,
                report: ProgressFn) -> dict:
    """Train lang more rounds until it draws the validation drawings' B prompts at MANY_STEPS at
    least ``spec.lang_check`` times as well as the base draws their A prompts (at most
    ``spec.lang_rounds`` rounds in all); what each check read, for the manifest."""
    if spec.lang_rounds <= 1:
        return {"rounds": 1, "steps": spec.lang.steps}
    from shoal.eval.drawing import score_drawing
    from shoal.zoo.judge import read_images

    def read(images: torch.Tensor):
        return read_images(judge, images)

    copies = 8
    with torch.random.fork_rng():
        report("lang check", 0, spec.lang_rounds)
        base_a = score_drawing(base, drawing_task(seed, "validation", "a", copies=copies), read,
                               steps=MANY_STEPS).accuracy
        task_b = drawing_task(seed, "validation", "b", copies=copies)
        history, passed = [], False
        for index in range(spec.lang_rounds):
            if index:
                lang_round(index)
            lang_b = score_drawing(lang, task_b, read, steps=MANY_STEPS).accuracy
            history.append({"steps": spec.lang.steps * (index + 1), "lang_b": round(lang_b, 4)})
            report("lang check", index + 1, spec.lang_rounds)
            passed = lang_b >= spec.lang_check * base_a
            if passed:
                break
    return {"rounds": len(history), "steps": history[-1]["steps"], "passed": passed,
            "base_a": round(base_a, 4), "needed": round(spec.lang_check * base_a, 4),
            "copies": copies, "history": history}


def build_drawing_world(size: str = "small", *, out: Path | None = None, seed: int = 0,
                        force: bool = False, progress: ProgressFn | None = None,
                        threads: int | None = 1) -> DrawingWorld:
    """Build the drawing world ``size`` for ``seed`` (or return the cached one).

    ``out`` is the world's folder (default: :func:`default_drawing_root`). A finished world
    there is returned at once unless ``force``. ``threads`` is torch's thread count during the
    build (None: leave torch's setting); one thread makes the weights independent of the core
    count, as for the language world.
    """
    spec = get_drawing_size(size)
    root = Path(out) if out is not None else default_drawing_root(size, seed)
    if not force:
        cached = load_drawing_world(size, seed, root=root)
        if cached is not None:
            return cached
    check_target(root, force)
    report = progress or no_progress
    started = time.monotonic()
    with staged_world(root, force) as staging:
        with _deterministic(threads) as used_threads:
            trained = _train_models(spec, seed, staging, report)
        manifest = {
            "drawing_world_version": DRAWING_WORLD_VERSION, "kind": "diffusion", "size": size,
            "seed": seed, "models": list(DRAWING_MODELS), "judge": "judge",
            "many_steps": MANY_STEPS, "few_steps": FEW_STEPS,
            "held_out": "language-B prompts at few_steps (fitness / validation / test splits)",
            "threads": used_threads, "build_seconds": round(time.monotonic() - started, 1),
            **trained,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return DrawingWorld(root=root, size=size, seed=seed, manifest=manifest)
