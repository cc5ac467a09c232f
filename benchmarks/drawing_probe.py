"""Does the drawing world pose the few-step problem, and does merging compose? Static merges, no search.

    OMP_NUM_THREADS=1 python benchmarks/drawing_probe.py --size small --seed 0 --split test

Builds (or loads) the drawing world of SIZE and SEED, then scores on SPLIT, with the fixed noise
seeds of ``shoal.eval.drawing`` (``--copies`` per prompt), at MANY_STEPS and FEW_STEPS (and, with
``--steps``, at other counts): the base on A prompts, the B specialist (``lang``) on B prompts, the
few-step specialist (``fast``) on A and B, and on B prompts at FEW_STEPS the task-arithmetic merges
``base + a (lang - base) + b (fast - base)`` (the UNet and the text encoder alike), the split
merge that takes the text encoder from ``lang`` and the UNet from ``base + (fast - base)``, and
merges with fast's UNet delta everywhere and lang's only in one part of the UNet (its
cross-attention, only its keys and values, or everything else). Prints
one line per row: all-attribute accuracy ± SE, n, the same on the prompts that name a cell and on
those that leave it open, diversity and the judge's per-attribute reading rates.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from shoal.eval.drawing import score_drawing
from shoal.zoo.diffusion_build import build_drawing_world, load_pipeline
from shoal.zoo.diffusion_models import FEW_STEPS, MANY_STEPS
from shoal.zoo.judge import read_images

WEIGHTS = ((1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (1.0, 1.5))


def _merge(pipes, unet: tuple[float, float], text: tuple[float, float]):  # type: ignore[no-untyped-def]
    merged = copy.deepcopy(pipes["base"])
    for component, (a, b) in (("unet", unet), ("text_encoder", text)):
        base = getattr(pipes["base"], component).state_dict()
        lang = getattr(pipes["lang"], component).state_dict()
        fast = getattr(pipes["fast"], component).state_dict()
        getattr(merged, component).load_state_dict(
            {k: base[k] + a * (lang[k] - base[k]) + b * (fast[k] - base[k]) for k in base})
    return merged


# Parts of the UNet (tensor-name tests) for the split merges: fast's delta everywhere, lang's
# only in the part. Since v3 lang's text encoder is the base's, so its B knowledge is in the UNet.
PARTS = {
    "cross-attention": lambda name: ".attn2." in name,
    "cross-attention keys and values": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
    "everything but cross-attention": lambda name: ".attn2." not in name,
}


def _merge_parts(pipes, part):  # type: ignore[no-untyped-def]
    merged = copy.deepcopy(pipes["base"])
    base, lang, fast = (pipes[m].unet.state_dict() for m in ("base", "lang", "fast"))
    merged.unet.load_state_dict({k: base[k] + (fast[k] - base[k])
                                 + (lang[k] - base[k] if part(k) else 0.0) for k in base})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("micro", "small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", choices=("fitness", "validation", "test"))
    parser.add_argument("--copies", type=int, default=8, help="noise seeds per prompt")
    parser.add_argument("--steps", type=int, nargs="*", default=[],
                        help="more step counts for the specialists' rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    world = build_drawing_world(args.size, seed=args.seed)
    judge = world.judge()
    pipes = {name: load_pipeline(world.model(name)) for name in ("base", "lang", "fast")}
    task_a = world.task(args.split, "a", copies=args.copies)
    task_b = world.task(args.split, "b", copies=args.copies)

    def row(name: str, pipe, task, steps: int) -> None:  # type: ignore[no-untyped-def]
        s = score_drawing(pipe, task, lambda images: read_images(judge, images), steps=steps)
        named = np.asarray(task.targets["cell"]) >= 0
        hits = np.asarray(s.hits)
        parts = " ".join(f"{label} {hits[mask].mean():.3f} (n {int(mask.sum())})"
                         for label, mask in (("cell named", named), ("open", ~named)) if mask.any())
        attrs = " ".join(f"{k} {v:.2f}" for k, v in s.per_attribute.items())
        print(f"{name:34s} {task.name:16s} steps {steps:2d}  all {s.accuracy:.3f} ± {s.stderr:.3f}"
              f"  n {s.n}  [{parts}]  diversity {s.diversity:.2f}  ({attrs})", flush=True)

    for steps in sorted({MANY_STEPS, FEW_STEPS, *args.steps}, reverse=True):
        row("base", pipes["base"], task_a, steps)
        row("lang", pipes["lang"], task_b, steps)
        row("fast", pipes["fast"], task_a, steps)
    row("fast", pipes["fast"], task_b, FEW_STEPS)
    for a, b in WEIGHTS:
        row(f"lang x {a} + fast x {b}", _merge(pipes, (a, b), (a, b)), task_b, FEW_STEPS)
    row("text encoder lang, UNet fast", _merge(pipes, (0.0, 1.0), (1.0, 0.0)), task_b, FEW_STEPS)
    for label, part in PARTS.items():  # lang's UNet delta only where it reads the prompt
        row(f"fast + lang in {label}", _merge_parts(pipes, part), task_b, FEW_STEPS)
    print(f"{time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
