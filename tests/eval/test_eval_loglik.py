"""Batched log-likelihood against a plain forward pass, one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from shoal.eval.loglik import loglik

CONTEXTS = ["what is two plus three ?", "one", "the cat is red and the dog is", "a", "yes no yes",
            "seven minus two is", "red blue green red blue green red blue green = ?"]
CONTINUATIONS = ["five", "two three four", "blue", "cat dog cat dog", "no", "five .", "red"]


def _reference(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): one unpadded forward pass, log-softmax, gather."""
    context_ids = tokenizer(context)["input_ids"]  # with <s>
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    total = 0.0
    for offset, token in enumerate(continuation_ids):
        total += float(log_probs[len(context_ids) - 1 + offset, token])
    return total


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_loglik_matches_one_at_a_time_reference(tiny_llama, word_tokenizer, batch_size):
    expected = [_reference(tiny_llama, word_tokenizer, c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    got = loglik(tiny_llama, word_tokenizer, CONTEXTS, CONTINUATIONS, batch_size=batch_size)
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(value < 0 for value in got)


def test_trailing_space_of_context_moves_to_continuation(tiny_llama, word_tokenizer):
    a = loglik(tiny_llama, word_tokenizer, ["seven minus two is "], ["five"])
    b = loglik(tiny_llama, word_tokenizer, ["seven minus two is"], [" five"])
    assert a == pytest.approx(b, abs=1e-6)


def test_empty_continuation_and_mismatched_lengths(tiny_llama, word_tokenizer):
    assert loglik(tiny_llama, word_tokenizer, ["one two"], [""]) == [0.0]
    with pytest.raises(ValueError):
        loglik(tiny_llama, word_tokenizer, ["one", "two"], ["three"])
