"""Packing and the training loop."""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shoal.zoo.corpus import documents, pretraining_mix, specialist_mix
from shoal.zoo.tokenizer import build_tokenizer
from shoal.zoo.train import TrainingSettings, lr_factor, masked_loss, pack, train


def test_pack_keeps_documents_whole_and_masks_only_completions() -> None:
    tokenizer = build_tokenizer()
    docs = [("tom has 3 apples . question : how many apples does tom have ? answer :", "3 ."),
            ("", "ann sees the red cups ."), ("sort : 3 1 2 =", "1 2 3 .")] * 4
    rows = pack(iter(docs), tokenizer, rows=3, seq_len=24)
    # Reference: lay the documents out by hand.
    expected_ids, expected_mask, row = [[]], [[]], 0
    for prompt, completion in docs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        tokens = [tokenizer.bos_token_id] + p + c + [tokenizer.eos_token_id]
        if len(expected_ids[row]) + len(tokens) > 24:
            row += 1
            if row == 3:
                break
            expected_ids.append([])
            expected_mask.append([])
        expected_ids[row] += tokens
        expected_mask[row] += [False] * (1 + len(p)) + [True] * (len(c) + 1)
    for r in range(3):
        n = len(expected_ids[r])
        assert rows.ids[r, :n].tolist() == expected_ids[r]
        assert rows.mask[r, :n].tolist() == expected_mask[r]
        assert (rows.ids[r, n:] == tokenizer.pad_token_id).all()
        assert not rows.mask[r, n:].any()


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    settings = TrainingSettings(steps=100, batch_size=1, seq_len=8, lr=1.0, warmup=10)
    factors = [lr_factor(s, settings) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert abs(lr_factor(100, settings) - 0.1) < 1e-9


def test_masked_loss_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2))
    ids = torch.randint(0, 20, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    logits = model(input_ids=ids).logits
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]]
             for b in range(2) for t in range(1, 6) if mask[b, t]]
    assert torch.allclose(masked_loss(model, ids, mask), torch.stack(terms).mean(), atol=1e-6)


def _tiny_run(seed: int, steps: int = 4) -> dict[str, torch.Tensor]:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    stream = documents(specialist_mix("lang", seed=0, train_size=200), random.Random(seed))
    losses = train(model, stream, tokenizer, TrainingSettings(steps, 4, 48, 1e-3, warmup=2),
                   seed=seed)
    assert len(losses) == steps and all(l == l for l in losses)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_for_a_seed() -> None:
    first, second, other = _tiny_run(1), _tiny_run(1), _tiny_run(2)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_pretraining_mix_weights_sum_to_one() -> None:
    assert abs(sum(c.weight for c in pretraining_mix()) - 1.0) < 1e-9
    for name in ("math", "lang", "sort", "count"):
        assert abs(sum(c.weight for c in specialist_mix(name, seed=0)) - 1.0) < 1e-9
