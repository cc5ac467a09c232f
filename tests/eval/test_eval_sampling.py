"""``sample_continuations``: the generation loop's sampling mode (REINFORCE) against a plain
reference that recomputes every step without a cache."""

from __future__ import annotations

import pytest
import torch

from shoal.eval.generation import generate_greedy, sample_continuations

PROMPTS = ["one two three", "red", "what is the answer ?", "cat dog cat dog cat", "yes no", "a"]


def _reference(model, tokenizer, prompts, *, max_new_tokens, batch_size, temperature, generator):  # type: ignore[no-untyped-def]
    """Left-padded batches in order, the whole sequence recomputed at every step, one multinomial
    draw per step for the whole batch; a finished row is fed the pad token."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids_out = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        seqs = [[pad] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        done = [False] * len(rows)
        new: list[list[int]] = [[] for _ in rows]
        for _ in range(max_new_tokens):
            ids, attn = torch.tensor(seqs), torch.tensor(mask)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attn,
                               position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].float()
            probs = torch.softmax(logits / temperature, dim=-1)
            drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
            for i, token in enumerate(drawn):
                if not done[i]:
                    new[i].append(token)
                    done[i] = token == eos
                seqs[i].append(pad if done[i] else token)
                mask[i].append(1)
            if all(done):
                break
        ids_out.extend(new)
    return ids_out


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sampling_matches_the_uncached_reference(tiny_llama, word_tokenizer, temperature):
    texts, ids = sample_continuations(tiny_llama, word_tokenizer, PROMPTS, max_new_tokens=6, batch_size=4,
                                      temperature=temperature, generator=torch.Generator().manual_seed(3))
    expected = _reference(tiny_llama, word_tokenizer, PROMPTS, max_new_tokens=6, batch_size=4,
                          temperature=temperature, generator=torch.Generator().manual_seed(3))
    assert ids == expected
    assert texts == [word_tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert len({tuple(row) for row in ids}) > 1  # not degenerate


def test_greedy_mode_answers_as_evaluation_does(tiny_llama, word_tokenizer):
    texts, ids = sample_continuations(tiny_llama, word_tokenizer, PROMPTS, max_new_tokens=6, sample=False)
    assert texts == generate_greedy(tiny_llama, word_tokenizer, PROMPTS, max_new_tokens=6)
    eos = word_tokenizer.eos_token_id
    assert all(eos not in row[:-1] for row in ids)  # a row ends at its eos


def test_no_prompts_and_a_bad_batch_size(tiny_llama, word_tokenizer):
    assert sample_continuations(tiny_llama, word_tokenizer, [], max_new_tokens=3) == ([], [])
    with pytest.raises(ValueError, match="batch_size"):
        sample_continuations(tiny_llama, word_tokenizer, PROMPTS, max_new_tokens=3, batch_size=0)
