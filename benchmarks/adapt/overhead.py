"""Two-pass overhead on a model of the small zoo world's shape (random weights: every answer
runs to max_new_tokens, the longest pass 2). Prompt dispatch by first-token log-likelihood
(one forward pass) vs generating the label; classifier dispatch."""
import sys, time, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from shoal.zoo.tokenizer import build_tokenizer
from shoal.zoo import get_zoo_task
from shoal.adapt import load_or_compute_svd, save_expert, make_meta, adapt_evaluate
torch.set_num_threads(1)
tok = build_tokenizer()
cfg = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=256,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg).eval()
out = Path("/tmp/adapt_bench/overhead"); out.mkdir(parents=True, exist_ok=True)
factors = load_or_compute_svd(model, cache_dir=out / "svd")
g = torch.Generator().manual_seed(0)
paths = []
for label in ("many", "then", "reverse", "sort"):
    z = {n: 1 + 0.1 * torch.randn(factors.rank(n), generator=g) for n in factors.names}
    paths.append(save_expert(out / f"{label}.safetensors", z, make_meta(factors, task=label)))
TEMPLATE = "{prompt} question : {labels} ? answer :"
for task_name in ("math_a", "reverse"):
    task = get_zoo_task(task_name)
    for strategy, kw in [("base", {}), ("prompt", {"mode": "first-token"}), ("prompt", {"mode": "loglik"}),
                         ("prompt", {"mode": "generate"}), ("classifier", {"classifier": paths[0]})]:
        r = adapt_evaluate(model, tok, task, "test", paths, strategy=strategy, limit=256, template=TEMPLATE,
                           batch_size=64, cache_dir=out / "svd", **kw)
        print(f"{task_name:8s} {strategy:10s} {kw.get('mode', ''):11s} pass1 {r.pass1_seconds:6.3f} s  "
              f"pass2 {r.pass2_seconds:6.3f} s  overhead {100 * r.overhead:6.1f}%  groups {len(r.categories)}")
