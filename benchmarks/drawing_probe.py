"""Does merging compose in the drawing world? Static merges of its specialists, before any search.

    OMP_NUM_THREADS=1 python benchmarks/drawing_probe.py --size small --seed 0 --split fitness

Builds (or loads) the drawing world of SIZE and SEED, then scores on SPLIT, with the fixed noise
seeds of ``shoal.eval.drawing`` (``--copies`` per prompt): the base on A prompts at 20 and 4 steps
and on B prompts at 20, the B specialist (``lang``) at 20 and 4, the 4-step specialist (``fast``) on
A and B at 4, and task-arithmetic merges ``base + a (lang - base) + b (fast - base)`` of the UNet and
the text encoder at 4 steps. Prints one line per row: all-four accuracy ± SE, n, diversity and the
per-attribute reading rates of the judge.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from shoal.eval.drawing import score_drawing
from shoal.zoo.diffusion_build import build_drawing_world, load_pipeline
from shoal.zoo.judge import read_images

WEIGHTS = ((1.0, 1.0), (1.0, 0.5), (0.5, 0.5), (0.5, 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("micro", "small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="fitness", choices=("fitness", "validation", "test"))
    parser.add_argument("--copies", type=int, default=4, help="noise seeds per prompt")
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
        attrs = " ".join(f"{k} {v:.2f}" for k, v in s.per_attribute.items())
        print(f"{name:26s} {task.name:16s} steps {steps:2d}  all four {s.accuracy:.3f} ± {s.stderr:.3f}"
              f"  n {s.n}  diversity {s.diversity:.2f}  ({attrs})", flush=True)

    row("base", pipes["base"], task_a, 20)
    row("base", pipes["base"], task_a, 4)
    row("base", pipes["base"], task_b, 20)
    row("lang", pipes["lang"], task_b, 20)
    row("lang", pipes["lang"], task_b, 4)
    row("fast", pipes["fast"], task_a, 4)
    row("fast", pipes["fast"], task_b, 4)
    for a, b in WEIGHTS:
        merged = copy.deepcopy(pipes["base"])
        for component in ("unet", "text_encoder"):
            base = getattr(pipes["base"], component).state_dict()
            lang = getattr(pipes["lang"], component).state_dict()
            fast = getattr(pipes["fast"], component).state_dict()
            getattr(merged, component).load_state_dict(
                {k: base[k] + a * (lang[k] - base[k]) + b * (fast[k] - base[k]) for k in base})
        row(f"lang x {a} + fast x {b}", merged, task_b, 4)
    print(f"{time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
