"""The README's Transformer² tables from `shoal svf study` runs on several world seeds.

    python benchmarks/adapt/study_tables.py runs/t2-seed0 runs/t2-seed1

Reads each study's ``results.json`` (and ``held_out-<task>.json`` from
``benchmarks/adapt/held_out.py`` when present) and prints Markdown: SVF against LoRA per skill
task and seed, the two-pass strategies on the held-out tasks, and pass-1 / pass-2 times. Every
score is % correct on the test split ± its standard error sqrt(p (1 - p) / (n - 1)).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

STRATEGIES = ("base", "prompt", "prompt-generate", "classifier", "few-shot")


def pct(p: float, n: int) -> str:
    se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
    return f"{100 * p:.1f} ± {100 * se:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, nargs="+")
    args = parser.parse_args()
    runs = [(path, json.loads((path / "results.json").read_text())) for path in args.studies]
    seed = {path: json.loads((Path(r["world"]) / "manifest.json").read_text())["seed"] for path, r in runs}
    print("| task | seed | base | SVF (REINFORCE) | LoRA (next-token) | SVF best step | LoRA best step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for task in runs[0][1]["experts"]:
        for path, r in runs:
            e = r["experts"][task]
            n = r["two_pass"][task]["base"]["n"]
            print(f"| {task} | {seed[path]} | {pct(e['base'], n)} | {pct(e['svf'], n)} | {pct(e['lora'], n)} | "
                  f"{e['svf_best_step']} | {e['lora_best_step']} |")
    e = runs[0][1]["experts"][next(iter(runs[0][1]["experts"]))]
    print(f"\nparameters: SVF {e['svf_parameters']:,}, LoRA {e['lora_parameters']:,}\n")
    print("| held-out task | seed | " + " | ".join(STRATEGIES) + " |")
    print("|---|---:|" + "---:|" * len(STRATEGIES))
    for path, r in runs:
        held = {r["settings"]["held_out"]: r["two_pass"][r["settings"]["held_out"]]}
        for extra in sorted(path.glob("held_out-*.json")):
            if "-shots" not in extra.name:
                held[extra.stem.removeprefix("held_out-")] = json.loads(extra.read_text())
        for task, rows in held.items():
            cells = [pct(rows[s]["score"], rows[s]["n"]) if s in rows else "–" for s in STRATEGIES]
            print(f"| {task} | {seed[path]} | " + " | ".join(cells) + " |")
    print("\n| seed | classifier routing (validation) | skill-task test prompts routed to their expert "
          "(classifier / prompt) |")
    print("|---:|---:|---:|")
    for path, r in runs:
        labels = r["settings"]["labels"]
        right = {k: 0 for k in ("classifier", "prompt")}
        total = 0
        for task, label in labels.items():
            for k in right:
                right[k] += r["two_pass"][task][k]["categories"].get(label, 0)
            total += r["two_pass"][task]["base"]["n"]
        print(f"| {seed[path]} | {100 * r['classifier']['validation']:.1f}% | "
              f"{100 * right['classifier'] / total:.1f}% / {100 * right['prompt'] / total:.1f}% |")
    print("\n| seed | task | " + " | ".join(f"{s} pass1/pass2" for s in STRATEGIES[1:]) + " |")
    print("|---:|---|" + "---:|" * (len(STRATEGIES) - 1))
    for path, r in runs:
        for task, rows in r["two_pass"].items():
            cells = [f"{100 * rows[s]['overhead']:.0f}%" if s in rows and rows[s]["overhead"] is not None else "–"
                     for s in STRATEGIES[1:]]
            print(f"| {seed[path]} | {task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
