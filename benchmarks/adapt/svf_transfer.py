"""z transfer between two `shoal svf study` runs on worlds of two seeds, both ways.

    OMP_NUM_THREADS=1 python benchmarks/adapt/svf_transfer.py runs/t2-seed0 runs/t2-seed1

Each study's SVF experts are applied unchanged (``transfer=True``) to the other world's base and
scored on that world's test split (the study's ``--limit`` examples). The ceiling, an expert
trained on that base with the same settings, is the other study's own expert: same settings and
seed give the same expert (what ``shoal svf study --transfer-root`` would retrain). Prints a
Markdown table with standard errors; writes ``transfer.json`` next to the first study.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def transfer(source: Path, target: Path) -> dict[str, dict[str, float]]:
    from shoal.adapt import _lm
    from shoal.adapt.expert import load_expert
    from shoal.adapt.svd_cache import load_or_compute_svd
    from shoal.adapt.svf import SVFAdapter
    from shoal.eval import load_model
    from shoal.zoo import load_zoo

    src, dst = (json.loads((p / "results.json").read_text()) for p in (source, target))
    if src["settings"] != dst["settings"]:
        raise SystemExit(f"{source} and {target} were run with other settings")
    root = Path(dst["world"])
    manifest = json.loads((root / "manifest.json").read_text())
    world = load_zoo(manifest["size"], manifest["seed"], root=root)
    model, tokenizer = load_model(world.model("base"))
    s = dst["settings"]
    factors = load_or_compute_svd(model, patterns=s["matrices"], cache_dir=target / "svd")
    adapter = SVFAdapter(model, factors, parametrization=s["parametrization"])
    rows = {}
    for task_name in src["experts"]:
        task = world.task(task_name)
        examples = list(task.examples("test"))[: s["limit"]]
        with adapter.applied(load_expert(source / f"svf-{task_name}.safetensors", factors, transfer=True).z):
            scores = _lm.score_examples(model, tokenizer, task, examples, batch_size=64)
        rows[task_name] = {"n": len(scores), "transferred": sum(scores) / len(scores),
                           "base": dst["experts"][task_name]["base"], "own": dst["experts"][task_name]["svf"],
                           "home_base": src["experts"][task_name]["base"],
                           "home_svf": src["experts"][task_name]["svf"]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    both = {f"{args.first.name} -> {args.second.name}": transfer(args.first, args.second),
            f"{args.second.name} -> {args.first.name}": transfer(args.second, args.first)}
    (args.first / "transfer.json").write_text(json.dumps(both, indent=1))
    print("| experts -> base | task | home base | home SVF | other base | + transferred SVF | + own SVF |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for direction, rows in both.items():
        for task_name, r in rows.items():
            n = r["n"]
            cells = [f"{100 * r[k]:.1f} ± {100 * _se(r[k], n):.1f}"
                     for k in ("home_base", "home_svf", "base", "transferred", "own")]
            print(f"| {direction} | {task_name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
