"""Test scores of the experts a `shoal svf study` folder holds so far (a run stopped before its end).

    OMP_NUM_THREADS=1 python benchmarks/adapt/study_experts.py runs/t2-seed1

``shoal svf study`` writes ``results.json`` only when everything is done. For a run that was
stopped (or is still running), this scores, for each skill task whose SVF training reached its
last step and whose LoRA baseline finished (``lora-<task>/study-record.json``), the base, the
SVF expert and the LoRA adapter on the test split exactly as the study does (the first
``limit`` examples of the settings in ``settings.json``), and prints the study's expert table
with standard errors. Writes ``experts.json`` in the folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--world-seed", type=int, required=True)
    parser.add_argument("--world", default="small")
    args = parser.parse_args()
    from peft import PeftModel

    from shoal.adapt import _lm
    from shoal.adapt.expert import load_expert
    from shoal.adapt.svd_cache import load_or_compute_svd
    from shoal.adapt.svf import SVFAdapter
    from shoal.eval import load_model
    from shoal.zoo import load_zoo

    torch.set_num_threads(1)
    s = json.loads((args.study / "settings.json").read_text())
    world = load_zoo(args.world, args.world_seed)
    model, tokenizer = load_model(world.model("base"))
    factors = load_or_compute_svd(model, patterns=s["matrices"], cache_dir=args.study / "svd")
    adapter = SVFAdapter(model, factors, parametrization=s["parametrization"])
    rows = {}
    for task_name in s["labels"]:
        state_file = args.study / f"svf-{task_name}.safetensors.train-state.pt"
        record_file = args.study / f"lora-{task_name}" / "study-record.json"
        if not state_file.exists() or not record_file.exists():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(state_file, weights_only=True)
        if state["step"] != s["steps"]:
            continue
        task = world.task(task_name)
        test = list(task.examples("test"))[: s["limit"]]

        def score(m: torch.nn.Module) -> float:
            scores = _lm.score_examples(m, tokenizer, task, test, batch_size=s["eval_batch_size"])
            return sum(scores) / len(scores)

        base = score(model)
        with adapter.applied(load_expert(args.study / f"svf-{task_name}.safetensors", factors).z):
            svf = score(model)
        lora_model = PeftModel.from_pretrained(copy.deepcopy(model), str(args.study / f"lora-{task_name}")).eval()
        record = json.loads(record_file.read_text())
        rows[task_name] = {"n": len(test), "base": base, "svf": svf, "lora": score(lora_model),
                           "svf_best_step": state["best_step"], "svf_validation": state["best_score"],
                           "lora_best_step": record["best_step"], "lora_validation": record["best_score"],
                           "svf_parameters": factors.num_values, "lora_parameters": record["num_parameters"]}
    (args.study / "experts.json").write_text(json.dumps(rows, indent=1))

    def pct(p: float, n: int) -> str:
        return f"{100 * p:.1f} ± {100 * math.sqrt(p * (1 - p) / (n - 1)):.1f}"

    print("| task | base | SVF | LoRA | SVF best step | LoRA best step |")
    print("|---|---:|---:|---:|---:|---:|")
    for task_name, r in rows.items():
        print(f"| {task_name} | {pct(r['base'], r['n'])} | {pct(r['svf'], r['n'])} | {pct(r['lora'], r['n'])} | "
              f"{r['svf_best_step']} | {r['lora_best_step']} |")


if __name__ == "__main__":
    main()
