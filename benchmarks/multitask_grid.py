"""Uniform multi-task merges of zoo specialists: how much of each skill does a merge keep?

For every combination of specialists given, merges them over the world's base with a grid of
uniform recipes (task arithmetic at several weights; TIES and DARE-TIES at several weights and
densities; the kept task vectors summed, ``normalize: false``), scores each merge on every
combined specialist's own task, and reports "kept": the mean over tasks of
merge score / specialist score. Pick a grid point on ``--split validation``; report on ``test``.

    python benchmarks/multitask_grid.py --split validation --combos lang+count,math+lang+count
    python benchmarks/multitask_grid.py --split test --combos lang+count,math+lang+count --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

WEIGHTS_TA = (0.5, 0.75, 1.0, 1.25, 1.5)
WEIGHTS = (1.0, 1.5)
DENSITIES = (0.3, 0.6, 0.9)


def grid() -> list[tuple[str, float, float | None]]:
    points: list[tuple[str, float, float | None]] = [("task_arithmetic", w, None) for w in WEIGHTS_TA]
    points += [(m, w, d) for m in ("ties", "dare_ties") for w in WEIGHTS for d in DENSITIES]
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--split", default="validation", choices=["fitness", "validation", "test"])
    parser.add_argument("--combos", default="lang+count,math+lang+count",
                        help="comma-separated combinations of specialists joined by '+'")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per result, not one bar per model load

    from shoal.eval.evaluate import evaluate
    from shoal.eval.loading import load_model
    from shoal.eval.registry import get_task
    from shoal.merge.execute import merge
    from shoal.merge.recipe import parse_recipe
    from shoal.zoo import build_zoo

    world = build_zoo(args.size)
    combos = [c.split("+") for c in args.combos.split(",") if c]
    names = sorted({n for combo in combos for n in combo})
    unknown = [n for n in names if n not in world.specialist_task]
    if unknown:
        raise SystemExit(f"not specialists of the {args.size} world: {unknown} "
                         f"(known: {sorted(world.specialist_task)})")

    def score(model_dir: Path, name: str) -> float:
        model, tokenizer = load_model(model_dir)
        task = get_task(world.specialist_task[name])
        return evaluate(model, tokenizer, task, args.split, limit=args.limit, batch_size=128).score

    specialist = {n: score(world.model(n), n) for n in names}
    print("specialists:", ", ".join(f"{n} {100 * s:.1f}" for n, s in specialist.items()), flush=True)
    rows = []
    print("| specialists | method | weight | density | " + " | ".join(names) + " | kept |")
    print("|---|---|---:|---:|" + "---:|" * (len(names) + 1))
    for combo in combos:
        for method, weight, density in grid():
            params = {"weight": weight} | ({"density": density} if density is not None else {})
            recipe = parse_recipe({
                "merge_method": method, "base_model": str(world.model("base")),
                "models": [{"model": str(world.model(n)), "parameters": params} for n in combo],
                "parameters": {} if method == "task_arithmetic" else {"normalize": False},
                "dtype": "float32"}, where="grid point")
            with tempfile.TemporaryDirectory() as tmp:
                merge(recipe, Path(tmp) / "merged", seed=0)
                scores = {n: score(Path(tmp) / "merged", n) for n in combo}
            # a specialist that scores 0 on its own task gives no measure of what was kept
            kept = (sum(scores[n] / specialist[n] for n in combo) / len(combo)
                    if all(specialist[n] > 0 for n in combo) else float("nan"))
            rows.append({"specialists": "+".join(combo), "method": method, "weight": weight,
                         "density": density, "scores": scores, "kept": kept})
            cells = " | ".join(f"{100 * scores[n]:.1f}" if n in scores else "" for n in names)
            print(f"| {'+'.join(combo)} | {method} | {weight} | {'' if density is None else density} | "
                  f"{cells} | {100 * kept:.1f} |", flush=True)
    for combo in combos:
        mine = [r for r in rows if r["specialists"] == "+".join(combo)]
        best = max(mine, key=lambda r: (r["kept"] == r["kept"], r["kept"]))  # NaN last
        print(f"best for {'+'.join(combo)} on {args.split}: {best['method']} weight {best['weight']} "
              f"density {best['density']}: kept {100 * best['kept']:.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "specialists": specialist, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
