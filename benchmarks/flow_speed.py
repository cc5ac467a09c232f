"""Inference cost of layer-path models vs their source model: batched greedy generation, tokens/s.

python flow_speed.py [--hidden 128 --inter 512 --layers 4] (zoo 'small' shape by default)
"""
import argparse, sys, tempfile, time
from pathlib import Path

import torch

import shoal  # noqa: F401
from shoal.eval.generation import generate_greedy
from shoal.flow.build import build_path_model
from shoal.flow.export import export_path
from shoal.flow.path import identity_path, make_path

sys.path.insert(0, str(Path(__file__).parent))

p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=128); p.add_argument("--inter", type=int, default=512)
p.add_argument("--layers", type=int, default=4); p.add_argument("--prompts", type=int, default=64)
p.add_argument("--new", type=int, default=24); p.add_argument("--batch", type=int, default=32)
p.add_argument("--threads", type=int, default=1); p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()
torch.set_num_threads(args.threads)

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders

words = ["<pad>", "<s>", "<unk>"] + [f"w{i}" for i in range(253)] + ["</s>"]  # eos (256) lies outside the model vocabulary: every row generates --new tokens
core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit(); core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>", padding_side="left")
root = Path(tempfile.mkdtemp())
srcs = []
for seed in (1, 2):
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=256, pad_token_id=0)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(root / f"m{seed}"); tok.save_pretrained(root / f"m{seed}")
    srcs.append(root / f"m{seed}")
rng = torch.Generator().manual_seed(0)
prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 253, (int(n),), generator=rng))
           for n in torch.randint(8, 40, (args.prompts,), generator=rng)]

L = args.layers
double = make_path([(0, i) for i in range(L)] + [(1, i) for i in range(L)])  # 2L hops, A then B
cases = {
    f"source llama ({L} layers)": LlamaForCausalLM.from_pretrained(srcs[0], dtype=torch.float32),
    f"path identity ({L} hops)": build_path_model(srcs, identity_path(L)),
    f"path A+B ({2*L} hops, scales 1)": build_path_model(srcs, double),
    f"path A+B ({2*L} hops, scales 0.9)": build_path_model(srcs, make_path([[m, l, 0.9] for m, l, _ in double.to_list()])),
    f"exported A+B llama ({2*L} layers)": LlamaForCausalLM.from_pretrained(export_path(srcs, double, root / "exp"), dtype=torch.float32),
}
counts, best = {}, {name: 0.0 for name in cases}
for name, model in cases.items():
    model.eval()
    counts[name] = [0]
    model.register_forward_hook(lambda mod, a, kw, out, c=counts[name]: c.__setitem__(0, c[0] + out.logits.shape[0]),
                                with_kwargs=True)
    generate_greedy(model, tok, prompts[:8], max_new_tokens=4, batch_size=args.batch)  # warm up
for _ in range(args.repeats):  # round robin, so load changes on the machine hit every case alike
    for name, model in cases.items():
        counts[name][0] = 0
        t0 = time.process_time()
        generate_greedy(model, tok, prompts, max_new_tokens=args.new, batch_size=args.batch)
        best[name] = max(best[name], counts[name][0] / (time.process_time() - t0))
for name in cases:
    print(f"{name:40s} {best[name]:9.0f} tokens/s  ({counts[name][0]} tokens per run)")
