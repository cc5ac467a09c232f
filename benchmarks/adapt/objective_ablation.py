"""SVF and LoRA, each trained by REINFORCE and by next-token loss, on one zoo task.

    OMP_NUM_THREADS=1 python benchmarks/adapt/objective_ablation.py --task lang_b --steps 100 \
        --cells svf:sft:2e-3,lora:reinforce:3e-3:4 --out /tmp/ablation

``shoal svf study`` trains SVF by REINFORCE (as the paper does) and its LoRA baseline by
next-token loss (our reading of how the paper trained its LoRA). When LoRA wins there, is it the parametrization
or the objective? Each cell ``method:objective:lr[:rank]`` trains one adapter with the study's
defaults otherwise (batch 256, SVF in chunks of 128 with gradient clip 1e-3, the reference
parametrization; LoRA clip 1.0 for next-token loss and 1e-3 for REINFORCE, greedy rollouts;
validation every 10 steps on 200 examples, the best step kept) and scores it on the first 500
test examples. ``svf:reinforce:2e-3`` and ``lora:sft:3e-3:4`` are the study's own settings
(benchmarks/RESULTS.md quotes the study for those two rows rather than re-running them). Prints a Markdown table; each cell's JSON (with its validation curve)
goes to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch


def cell(spec: str, task_name: str, steps: int, out: Path, world: object, *, eval_every: int = 10,
         resume: bool = False) -> dict:
    from shoal.adapt import _lm
    from shoal.eval import load_model

    method, objective, lr_text, *rank = spec.split(":")
    lr = float(lr_text)
    model, tokenizer = load_model(world.model("base"))  # type: ignore[attr-defined]
    task = world.task(task_name)  # type: ignore[attr-defined]
    test = list(task.examples("test"))[:500]
    common = dict(objective=objective, steps=steps, batch_size=256, eval_every=eval_every, validation_limit=200,
                  seed=0)
    started = time.perf_counter()
    if method == "svf":
        from shoal.adapt.expert import load_expert
        from shoal.adapt.svd_cache import load_or_compute_svd
        from shoal.adapt.svf import SVFAdapter
        from shoal.adapt.train import train_svf

        factors = load_or_compute_svd(model, cache_dir=out / "svd")
        result = train_svf(model, tokenizer, task, out=out / "expert.safetensors", lr=lr, resume=resume,
                           micro_batch_size=128, factors=factors, **common)
        trained = time.perf_counter() - started
        with SVFAdapter(model, factors).applied(load_expert(result.path, factors).z):
            scores = _lm.score_examples(model, tokenizer, task, test, batch_size=64)
    elif method == "lora":
        from peft import PeftModel

        from shoal.studies.lora_baseline import train_lora

        clip = 1.0 if objective == "sft" else 1e-3
        result = train_lora(model, tokenizer, task, out=out / "lora", rank=int(rank[0]) if rank else 4, lr=lr,
                            clip=clip, sample=False, **common)
        trained = time.perf_counter() - started
        adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(result.path)).eval()
        scores = _lm.score_examples(adapted, tokenizer, task, test, batch_size=64)
    else:
        raise SystemExit(f"unknown method {method!r} in cell {spec!r}; use svf or lora")
    p, n = sum(scores) / len(scores), len(scores)
    return {"cell": spec, "task": task_name, "steps": steps, "parameters": result.num_parameters,
            "best_step": result.best_step, "validation": result.best_score, "base_validation": result.base_score,
            "test": p, "se": math.sqrt(p * (1 - p) / (n - 1)), "n": n, "train_s": round(trained, 1),
            "history": [r.__dict__ for r in result.history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--task", default="lang_b")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cells", default="svf:sft:2e-3,lora:reinforce:3e-3:4")
    parser.add_argument("--eval-every", type=int, default=10, help="validation every N steps (the best is kept)")
    parser.add_argument("--resume", action="store_true",
                        help="SVF cells continue from their last validation (train_svf's state file)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from shoal.zoo import load_zoo

    torch.set_num_threads(1)
    world = load_zoo(args.world, args.world_seed)
    if world is None:
        raise SystemExit(f"no built {args.world} world for seed {args.world_seed}")
    print("| cell | params | best step | validation (base) | test ± SE (n) | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in args.cells.split(","):
        folder = args.out / f"{args.task}-{spec.replace(':', '_')}-{args.steps}"
        folder.mkdir(parents=True, exist_ok=True)
        row = cell(spec, args.task, args.steps, folder, world, eval_every=args.eval_every, resume=args.resume)
        (folder / "cell.json").write_text(json.dumps(row, indent=1))
        print(f"| {spec} | {row['parameters']:,} | {row['best_step']} | {100 * row['validation']:.1f} "
              f"({100 * row['base_validation']:.1f}) | {100 * row['test']:.1f} ± {100 * row['se']:.1f} "
              f"({row['n']}) | {row['train_s']} |", flush=True)


if __name__ == "__main__":
    main()
