"""Evaluation speed: shoal's batched greedy generation against one-at-a-time ``generate``.

    python benchmarks/eval_speed.py [--task math_a] [--model math] [--root WORLD_DIR]
        [--limit 500] [--repeats 3] [--batch-sizes 64,256] [--threads 1] [--device cpu]

Uses model ``--model`` of the ``small`` zoo world (the cached one from ``shoal zoo build``, or
the one at ``--root``) when it exists, else a random Llama of the same shape over the zoo's
tokenizer (a random model never emits eos, so every row runs to the full token budget: the
worst case for early stopping). Also times transformers' ``generate`` on left-padded batches.
Prints the median and fastest time of each way, the speed-up over one-at-a-time generation,
and how many outputs are identical to it. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _model(args):
    from shoal.eval import load_model, prepare_tokenizer
    from shoal.zoo import load_zoo

    world = load_zoo(args.world, root=args.root)
    if world is not None and args.model in world.models:
        model, tokenizer = load_model(world.model(args.model), device=args.device)
        return model, tokenizer, f"zoo {args.world} world at {world.root}, model {args.model!r}"
    from transformers import LlamaConfig, LlamaForCausalLM

    from shoal.zoo.sizes import get_size
    from shoal.zoo.tokenizer import build_tokenizer

    tokenizer = prepare_tokenizer(build_tokenizer())
    shape = get_size(args.world).shape
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                         num_key_value_heads=shape.num_heads,
                         max_position_embeddings=shape.max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(args.device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, f"random Llama of the {args.world} world's shape (world not built)"


def _one_at_a_time(model, tokenizer, prompts, max_new_tokens, stops):
    from shoal.eval.generation import cut_at_stop

    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
            out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
            text = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs.append(cut_at_stop(text, stops))
    return outputs


def _hf_batched(model, tokenizer, prompts, max_new_tokens, stops, batch_size):
    """transformers' ``generate`` on left-padded batches, for comparison."""
    from shoal.eval.generation import cut_at_stop

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
            width = encoded["input_ids"].shape[1]
            outputs.extend(cut_at_stop(tokenizer.decode(row[width:], skip_special_tokens=True),
                                       stops) for row in out)
    return outputs


def _time_interleaved(ways, repeats):
    """Run every way once per round, ``repeats`` rounds, so that load from other processes
    falls on all of them alike. Returns {label: (median s, min s, outputs)}."""
    times = {label: [] for label, _ in ways}
    outputs = {}
    for _ in range(repeats):
        for label, fn in ways:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[label] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(t), min(t), outputs[label]) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--root", default=None, help="world folder (default: the cache)")
    parser.add_argument("--model", default="math")
    parser.add_argument("--task", default="math_a")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from shoal.eval import generate_greedy, get_task, select_examples
    from shoal.eval.evaluate import task_stop_strings

    model, tokenizer, source = _model(args)
    task = get_task(args.task)
    prompts = [e.prompt for e in select_examples(task, args.split, args.limit)]
    stops = task_stop_strings(task)
    new = task.max_new_tokens
    print(f"model: {source}; task {args.task} [{args.split}], {len(prompts)} prompts, "
          f"max_new_tokens={new}; device {args.device}; torch threads {torch.get_num_threads()}")

    baseline = "one-at-a-time HF generate"
    ways = [(baseline, lambda: _one_at_a_time(model, tokenizer, prompts, new, stops))]
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        ways.append((f"HF generate, left-padded, b={batch_size}",
                     lambda b=batch_size: _hf_batched(model, tokenizer, prompts, new, stops, b)))
        ways.append((f"shoal generate_greedy, b={batch_size}",
                     lambda b=batch_size: generate_greedy(model, tokenizer, prompts,
                                                          max_new_tokens=new, batch_size=b,
                                                          stop_strings=stops)))
    results = _time_interleaved(ways, args.repeats)
    base_median, _, reference = results[baseline]
    print(f"{'way':34s} {'median s':>9s} {'min s':>8s} {'speed-up':>9s}  outputs identical")
    for label, (median, fastest, outputs) in results.items():
        same = sum(a == b for a, b in zip(outputs, reference))
        print(f"{label:34s} {median:9.3f} {fastest:8.3f} {'x%.1f' % (base_median / median):>9s}"
              f"  {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
