"""The PEFT LoRA baseline runs on the same data and matrices as SVF."""

from __future__ import annotations

import torch
from test_adapt_train import reference_nll

from shoal.adapt import load_or_compute_svd
from shoal.studies.lora_baseline import train_lora


def test_lora_baseline_trains_and_counts_parameters(llama, word_tokenizer, toy_tasks, svd_dir, tmp_path):
    from peft import PeftModel

    original = {k: v.clone() for k, v in llama.state_dict().items()}
    task = toy_tasks["ay"]
    before = reference_nll(llama, word_tokenizer, task.examples("validation"))
    result = train_lora(llama, word_tokenizer, task, out=tmp_path / "lora", rank=4, lr=1e-2, steps=10,
                        batch_size=16, eval_every=5)
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    # rank r on an (out, in) matrix trains A (r, in) and B (out, r)
    assert result.num_parameters == sum(4 * (m + n) for m, n in factors.shapes.values()) == 2304
    assert result.num_parameters > 10 * factors.num_values
    assert all(torch.equal(v, original[k]) for k, v in llama.state_dict().items())  # the base is untouched
    assert [r.step for r in result.history] == [5, 10]
    adapted = PeftModel.from_pretrained(llama, str(result.path)).eval()
    after = reference_nll(adapted, word_tokenizer, task.examples("validation"))
    assert after < before - 0.1


def test_lora_baseline_is_reproducible_whatever_the_global_generator(llama, word_tokenizer, toy_tasks, tmp_path):
    from safetensors.torch import load_file

    runs = []
    for i, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        result = train_lora(llama, word_tokenizer, toy_tasks["ay"], out=tmp_path / f"lora{i}", rank=2, steps=2,
                            batch_size=4, eval_every=2, validation_limit=4)
        runs.append(load_file(str(result.path / "adapter_model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
