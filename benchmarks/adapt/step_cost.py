"""Per-step cost of SVF training (differentiable re-composition) vs LoRA vs full fine-tuning,
and the cost of switching experts in place, on a model of the small zoo world's shape."""
import sys, time, copy, torch
from transformers import AutoConfig, AutoModelForCausalLM
from shoal.adapt import load_or_compute_svd, SVFAdapter
from shoal.adapt.reinforce import sft_loss
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
cfg = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=247, max_position_embeddings=128)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg).eval()
B, T = 16, 32
ids = torch.randint(4, 247, (B, T)); mask = torch.zeros(B, T, dtype=torch.bool); mask[:, 24:] = True
factors = load_or_compute_svd(model, use_cache=False)
adapter = SVFAdapter(model, factors)

def timeit(fn, n=20):
    fn(); fn()
    t = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t) / n

model.requires_grad_(False)
z = {n: torch.ones_like(factors.S[n], requires_grad=True) for n in factors.names}
def svf_step():
    logits = adapter.forward(z, input_ids=ids).logits
    sft_loss(logits, ids, mask).backward()
def recompose_only():
    w = adapter.adapted_weights(z); sum(v.sum() for v in w.values()).backward()
def frozen_forward():
    with torch.no_grad(): model(input_ids=ids)
full = copy.deepcopy(model).requires_grad_(True)
def full_step():
    sft_loss(full(input_ids=ids).logits, ids, mask).backward()
from peft import LoraConfig, get_peft_model
lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=[n[:-7] for n in factors.names]))
def lora_step():
    sft_loss(lora(input_ids=ids).logits, ids, mask).backward()
zz = {n: torch.rand_like(factors.S[n]) + 0.5 for n in factors.names}
print(f"threads={torch.get_num_threads()} batch={B}x{T} matrices={len(factors.names)} svf_params={factors.num_values} "
      f"lora_r4_params={sum(p.numel() for p in lora.parameters() if p.requires_grad)}")
for name, fn in [("frozen forward (no grad)", frozen_forward), ("full fine-tune step", full_step),
                 ("SVF step (recompose + fwd + bwd)", svf_step), ("  of which recompose fwd+bwd", recompose_only),
                 ("LoRA r=4 step", lora_step), ("apply expert in place", lambda: adapter.apply(zz)),
                 ("restore", adapter.restore)]:
    print(f"{name:36s} {1000 * timeit(fn):8.2f} ms")
