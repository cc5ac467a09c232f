"""Two-pass overhead (pass-1 time / pass-2 time) against answer length, on the small zoo world.

The seed-0 small world's base with the experts and classifier written by `shoal svf study`
(STUDY_DIR). 64 test prompts from each skill task (256 in all, batch 64). The eos logit is set
to -inf so that every answer runs to exactly max_new_tokens, and the per-row re-generation of
near ties is off, so pass 2 is the plain cost of batched greedy generation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adapt/overhead_length.py STUDY_DIR [3 16 64 256]

Each cell is the median of 3 runs.
"""
import functools
import statistics
import sys
from pathlib import Path

import torch

import shoal.adapt.two_pass as two_pass
from shoal.adapt import adapt_generate
from shoal.studies.svf_study import DEFAULT_LABELS, DEFAULT_TEMPLATE
from shoal.eval import load_model
from shoal.eval.generation import generate_greedy
from shoal.zoo import load_zoo

torch.set_num_threads(1)
study = Path(sys.argv[1])
lengths = [int(a) for a in sys.argv[2:]] or [3, 16, 64, 256]
world = load_zoo("small", 0)
model, tokenizer = load_model(world.model("base"))
eos = tokenizer.eos_token_id
model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([eos]), float("-inf")))
two_pass.generate_greedy = functools.partial(generate_greedy, recheck_ties=False)
experts = [study / f"svf-{task}.safetensors" for task in DEFAULT_LABELS]
prompts = [ex.prompt for task in DEFAULT_LABELS for ex in list(world.task(task).examples("test"))[:64]]
strategies = [("base", "base", {}), ("prompt, first token", "prompt", {"mode": "first-token"}),
              ("prompt, generate", "prompt", {"mode": "generate"}),
              ("classifier", "classifier", {"classifier": study / "classifier.safetensors"})]


def run(strategy: str, n: int, **kwargs: object) -> tuple[float, float]:
    r = adapt_generate(model, tokenizer, prompts, experts, strategy=strategy, max_new_tokens=n,  # type: ignore
                       template=DEFAULT_TEMPLATE, batch_size=64, cache_dir=study / "svd", **kwargs)
    assert all(len(tokenizer(o, add_special_tokens=False)["input_ids"]) > 0 for o in r.outputs)
    return r.pass1_seconds, r.pass2_seconds


print("| new tokens | pass 2 (base), s | " + " | ".join(f"{name}: pass 1 s (overhead)" for name, _, _ in strategies[1:])
      + " |")
print("|---:|---:|" + "---:|" * (len(strategies) - 1))
for n in lengths:
    cells = []
    pass2_base = 0.0
    for name, strategy, kwargs in strategies:
        runs = [run(strategy, n, **kwargs) for _ in range(3)]
        pass1 = statistics.median(p1 for p1, _ in runs)
        pass2 = statistics.median(p2 for _, p2 in runs)
        if strategy == "base":
            pass2_base = pass2
            continue
        cells.append(f"{pass1:.3f} ({100 * pass1 / pass2:.0f}%)")
    print(f"| {n} | {pass2_base:.2f} | " + " | ".join(cells) + " |", flush=True)
