"""How much reward signal REINFORCE gets from a zoo base at step 0, per skill task.

    OMP_NUM_THREADS=1 python benchmarks/adapt/rl_signal.py --seeds 0,1 --examples 512 --samples 4

SVF's REINFORCE (the reference's: reward +1 / -1, no baseline) learns from the base model's own
completions. On a task the base almost never solves, nearly every reward is -1: the gradient
only pushes probability away from the wrong answers it produced, not towards the right one.
This prints, per world seed and task, on the first ``--examples`` training examples: the share
of greedy completions that are right (the share of +1 rewards in the first reference-style
batch), the same for completions sampled at temperature 1, and the share of examples where at
least one of ``--samples`` samples is right.
"""

from __future__ import annotations

import argparse

import torch


def signal(world: object, task_name: str, examples: int, samples: int) -> dict:
    from shoal.adapt import _lm
    from shoal.eval import load_model

    model, tokenizer = load_model(world.model("base"))  # type: ignore[attr-defined]
    task = world.task(task_name)  # type: ignore[attr-defined]
    rows = list(task.examples("train"))[:examples]
    prompts = [ex.prompt for ex in rows]

    def right(sample: bool, generator: torch.Generator | None) -> list[float]:
        outputs, _ = _lm.generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=64,
                                  sample=sample, generator=generator)
        return [float(task.score(out, ex)) for out, ex in zip(outputs, rows)]

    greedy = right(False, None)
    generator = torch.Generator().manual_seed(0)
    draws = [right(True, generator) for _ in range(samples)]
    any_right = [max(d[i] for d in draws) for i in range(len(rows))]
    n = len(rows)
    return {"task": task_name, "n": n, "greedy": sum(greedy) / n,
            "sampled": sum(sum(d) for d in draws) / (n * samples), "any_of_k": sum(any_right) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--tasks", default="math_a,lang_b,sort,count")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    from shoal.zoo import load_zoo

    torch.set_num_threads(1)
    print(f"| seed | task | n | greedy right (+1 rewards) | sampled T=1 right | >= 1 of {args.samples} samples right |")
    print("|---:|---|---:|---:|---:|---:|")
    for seed in map(int, args.seeds.split(",")):
        world = load_zoo(args.world, seed)
        if world is None:
            raise SystemExit(f"no built {args.world} world for seed {seed}")
        for task_name in args.tasks.split(","):
            r = signal(world, task_name, args.examples, args.samples)
            print(f"| {seed} | {task_name} | {r['n']} | {100 * r['greedy']:.1f}% | {100 * r['sampled']:.1f}% | "
                  f"{100 * r['any_of_k']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
