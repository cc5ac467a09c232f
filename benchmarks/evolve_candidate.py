"""Per-candidate cost of evolutionary search: in-memory candidate vs merge-to-disk-and-reload.

For one evolve config over a zoo world, times (median of --repeats):
- in memory: plan + merge every tensor + copy into the resident model (what ``shoal evolve`` does);
- round trip: ``shoal.merge.merge`` to a temporary folder + ``AutoModelForCausalLM.from_pretrained``;
- evaluation: scoring one candidate on the fitness split (``--limit`` examples).

    python benchmarks/evolve_candidate.py --size small --repeats 5 --limit 500
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from shoal.studies.evolve_demo import demo_config
    from shoal.evolve.evaluators import Evaluator
    from shoal.merge.execute import merge
    from shoal.zoo import build_zoo

    world = build_zoo(args.size)
    config = demo_config(world, trials=1, limit=args.limit)
    evaluator = Evaluator(config)
    rng = random.Random(0)
    genomes = [{g.key: rng.random() for g in evaluator.space.genes} for _ in range(args.repeats)]
    recipes = [evaluator.space.decode(g) for g in genomes]
    evaluator.builder.apply(evaluator.model, recipes[0])  # warm the source cache

    memory, disk, scoring = [], [], []
    for recipe in recipes:
        start = time.perf_counter()
        evaluator.builder.apply(evaluator.model, recipe, seed=config.seed)
        memory.append(time.perf_counter() - start)

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            merge(recipe, Path(tmp) / "m", seed=config.seed)
            AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
            disk.append(time.perf_counter() - start)

        start = time.perf_counter()
        evaluator.score_recipe(recipe, config.fitness.task, config.fitness.split, config.fitness.limit)
        scoring.append(time.perf_counter() - start)
    evaluator.close()

    m, d, s = (statistics.median(x) for x in (memory, disk, scoring))
    print(f"world {args.size}, {len(evaluator.space.genes)} genes, {args.repeats} candidates, "
          f"threads {args.threads}")
    print(f"in-memory candidate     median {m * 1000:8.1f} ms")
    print(f"merge to disk + reload  median {d * 1000:8.1f} ms   ({d / m:.1f}x the in-memory build)")
    print(f"evaluation ({args.limit} ex.)  median {s * 1000:8.1f} ms   (build = {100 * m / s:.1f}% of it;"
          f" scoring includes one in-memory build)")


if __name__ == "__main__":
    main()
