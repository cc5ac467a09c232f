"""A `shoal svf study`'s two-pass strategies on another held-out task, with its experts as they are.

    OMP_NUM_THREADS=1 python benchmarks/adapt/held_out.py runs/t2-seed0 --task max

The study evaluates one held-out task (``math_b``); the zoo holds out a second one, ``max``,
which no specialist trains on. This runs the study's own two-pass evaluation (the same call, the
same settings from ``results.json``: base, prompt first-token, prompt generate, classifier
expert, few-shot CEM) on ``--task`` with the study's experts and classifier, and prints one
Markdown row with standard errors; the rows go to ``held_out-<task>.json`` in the study folder.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

STRATEGIES = (("base", "base", {}), ("prompt", "prompt", {"mode": "first-token"}),
              ("prompt-generate", "prompt", {"mode": "generate"}), ("classifier", "classifier", None),
              ("few-shot", "few-shot", None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--task", default="max")
    parser.add_argument("--strategies", default=",".join(name for name, _, _ in STRATEGIES))
    parser.add_argument("--shots", type=int, default=None, help="few-shot examples (default: the study's)")
    args = parser.parse_args()
    from shoal.adapt.two_pass import adapt_evaluate
    from shoal.eval import load_model
    from shoal.zoo import load_zoo

    torch.set_num_threads(1)
    results = json.loads((args.study / "results.json").read_text())
    s = results["settings"]
    root = Path(results["world"])
    manifest = json.loads((root / "manifest.json").read_text())
    world = load_zoo(manifest["size"], manifest["seed"], root=root)
    model, tokenizer = load_model(world.model("base"))
    task = world.task(args.task)
    experts = [args.study / f"svf-{t}.safetensors" for t in s["labels"]]
    rows = {}
    wanted = args.strategies.split(",")
    shots = args.shots or s["shots"]
    for name, strategy, kwargs in STRATEGIES:
        if name not in wanted:
            continue
        if kwargs is None:
            kwargs = {"classifier": args.study / "classifier.safetensors"} if name == "classifier" else \
                {"n_shots": shots}
        r = adapt_evaluate(model, tokenizer, task, "test", experts, strategy=strategy, limit=s["limit"],
                           template=s["template"], cem_iterations=s["cem_iterations"],
                           cem_population=s["cem_population"], seed=s["seed"], batch_size=s["eval_batch_size"],
                           cache_dir=args.study / "svd", **kwargs)
        rows[name] = {"score": r.score, "n": r.n, "categories": r.categories, "alpha": r.alpha}
    tag = "" if args.shots is None else f"-shots{shots}"
    (args.study / f"held_out-{args.task}{tag}.json").write_text(json.dumps(rows, indent=1))
    cells = [f"{100 * r['score']:.1f} ± {100 * math.sqrt(r['score'] * (1 - r['score']) / (r['n'] - 1)):.1f}"
             for r in rows.values()]
    print("| task | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print(f"| {args.task} ({shots} shots) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
