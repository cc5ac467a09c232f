"""SVF against LoRA by training budget and adapted matrices, on the zoo's skill tasks.

    OMP_NUM_THREADS=1 python benchmarks/adapt/svf_budget.py --tasks lang_b,math_a,sort,count \
        --steps 300,1000 --matrices mlp,all --out /tmp/svf_budget

``shoal svf study`` compares SVF and LoRA at one budget (its ``--steps``) on the MLP matrices.
This grid asks whether a gap there is the method or the budget: each cell trains one expert
(SFT objective, batch 32, validation every 50 steps on 200 examples, the best step kept; SVF lr
3e-2, LoRA rank 4 with lr 3e-3, as in the README's study) and scores it on the first 500
test examples. ``mlp`` adapts gate/up/down (the paper's choice); ``all`` adds q/k/v/o. LoRA
adapts the same matrices as SVF. Prints a Markdown table; each cell's JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

MATRICES = {"mlp": None, "all": [r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$"]}


def cell(method: str, task_name: str, steps: int, matrices: str, out: Path, world: object) -> dict:
    from shoal.adapt import _lm
    from shoal.eval import load_model

    model, tokenizer = load_model(world.model("base"))  # type: ignore[attr-defined]
    task = world.task(task_name)  # type: ignore[attr-defined]
    patterns = MATRICES[matrices]
    common = dict(objective="sft", steps=steps, batch_size=32, eval_every=50, validation_limit=200, seed=0,
                  patterns=patterns)
    started = time.perf_counter()
    if method == "svf":
        from shoal.adapt.expert import load_expert
        from shoal.adapt.svd_cache import load_or_compute_svd
        from shoal.adapt.svf import SVFAdapter
        from shoal.adapt.train import train_svf

        factors = load_or_compute_svd(model, patterns=patterns, cache_dir=out / "svd")
        result = train_svf(model, tokenizer, task, out=out / "expert.safetensors", lr=3e-2, resume=False,
                           factors=factors, **common)
        trained = time.perf_counter() - started
        with SVFAdapter(model, factors).applied(load_expert(result.path, factors).z):
            scores = _lm.score_examples(model, tokenizer, task, list(task.examples("test"))[:500], batch_size=64)
    else:
        from peft import PeftModel

        from shoal.studies.lora_baseline import train_lora

        result = train_lora(model, tokenizer, task, out=out / "lora", rank=4, lr=3e-3, **common)
        trained = time.perf_counter() - started
        adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(result.path)).eval()
        scores = _lm.score_examples(adapted, tokenizer, task, list(task.examples("test"))[:500], batch_size=64)
    return {"method": method, "task": task_name, "steps": steps, "matrices": matrices,
            "parameters": result.num_parameters, "best_step": result.best_step, "validation": result.best_score,
            "test": sum(scores) / len(scores), "n": len(scores), "train_s": round(trained, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--tasks", default="lang_b,math_a,sort,count")
    parser.add_argument("--steps", default="300,1000")
    parser.add_argument("--matrices", default="mlp,all")
    parser.add_argument("--methods", default="svf,lora")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from shoal.zoo import build_zoo

    torch.set_num_threads(1)
    world = build_zoo(args.world, seed=0)
    rows = []
    for task_name in args.tasks.split(","):
        for matrices in args.matrices.split(","):
            for steps in map(int, args.steps.split(",")):
                for method in args.methods.split(","):
                    folder = args.out / f"{method}-{matrices}-{steps}-{task_name}"
                    folder.mkdir(parents=True, exist_ok=True)
                    row = cell(method, task_name, steps, matrices, folder, world)
                    (folder / "result.json").write_text(json.dumps(row, indent=2))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print("\n| task | matrices | steps | method | trainable params | best step | validation | test (n) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['matrices']} | {r['steps']} | {r['method']} | {r['parameters']:,} | "
              f"{r['best_step']} | {100 * r['validation']:.1f} | {100 * r['test']:.1f} ({r['n']}) |")


if __name__ == "__main__":
    main()
