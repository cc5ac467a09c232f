"""Does the VLM world compose? Static merges of the VLM's language model and the language-B
specialist, before any search (issue 16's probe).

Builds (or reuses) the VLM world of SIZE and SEED, then scores task-arithmetic merges
``base + a (vlm_lm - base) + b (lang - base)`` (the VLM's vision tower and projector copied)
on the image tasks, in memory, with plain torch arithmetic (no shoal merge code, so it also
checks the library's merges from outside)::

    flock /work/notes/heavyB.lock nice -n 10 python benchmarks/vlm_probe.py --size small --seed 0 \\
        --n 300 --split validation [--out FOLDER]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", type=Path, default=None, help="VLM world folder (default: the cache)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    from shoal.eval.evaluate import evaluate
    from shoal.eval.scoring import mean_stderr
    from shoal.zoo import build_vlm_world, build_zoo, get_image_task

    torch.set_num_threads(1)
    words = build_zoo(args.size, seed=args.seed)
    started = time.monotonic()
    world = build_vlm_world(args.size, seed=args.seed, out=args.out)
    print(f"VLM world {world.root} ready after {time.monotonic() - started:.0f} s", flush=True)
    base = AutoModelForCausalLM.from_pretrained(words.model("base"))
    lang = AutoModelForCausalLM.from_pretrained(words.model("lang"))
    vlm = LlavaForConditionalGeneration.from_pretrained(world.model("vlm")).eval()
    processor = AutoProcessor.from_pretrained(world.model("vlm"))
    vlm_lm = {k: v.clone() for k, v in vlm.model.language_model.state_dict().items()}
    vlm_head = vlm.lm_head.weight.detach().clone()
    b_sd, l_sd = base.model.state_dict(), lang.model.state_dict()

    def set_language_model(a: float, b: float) -> None:
        vlm.model.language_model.load_state_dict(
            {k: b_sd[k] + a * (vlm_lm[k] - b_sd[k]) + b * (l_sd[k] - b_sd[k]) for k in vlm_lm})
        head = base.lm_head.weight
        vlm.lm_head.weight.data.copy_(head + a * (vlm_head - head) + b * (lang.lm_head.weight - head))

    tasks = {name: get_image_task(name, args.seed) for name in ("look_a", "vqa_a", "look_b", "vqa_b")}
    print(f"| vlm a | lang b | " + " | ".join(f"{t} ROUGE-L | {t} exact" for t in tasks) + " |")
    for a, b in [(1, 0), (0, 1), (1, 1), (1, 0.5), (1, 1.5), (0.7, 1), (1.2, 1.2)]:
        set_language_model(a, b)
        cells = []
        for task in tasks.values():
            result = evaluate(vlm, processor, task, args.split, limit=args.n, batch_size=100)
            exact = [1.0 if s >= 1.0 else 0.0 for s in result.scores]
            cells.append(f"{result.score:.3f} ± {result.stderr:.3f} | "
                         f"{sum(exact) / len(exact):.3f} ± {mean_stderr(exact):.3f}")
        print(f"| {a} | {b} | " + " | ".join(cells) + f" |  n={result.n} e.g. {result.outputs[:3]}",
              flush=True)


if __name__ == "__main__":
    main()
