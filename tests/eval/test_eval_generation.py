"""Batched greedy generation must reproduce one-at-a-time ``model.generate``."""

from __future__ import annotations

import random

import pytest
import torch

from shoal.eval.generation import generate_greedy

MAX_NEW = 8


VOCAB = ("zero one two three four five six seven eight nine ten plus minus is what answer the a "
         "cat dog red blue green yes no . ? ; : - = end stop").split()


def _prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = VOCAB
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(count)]


def _reference(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, through transformers' own greedy search."""
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def _cut(text: str, stops: list[str]) -> str:
    positions = [text.find(s) for s in stops if s in text]
    return text[:min(positions)] if positions else text


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return _prompts(14)


@pytest.fixture(scope="module")
def reference(tiny_llama, word_tokenizer, prompts) -> list[str]:
    return [_reference(tiny_llama, word_tokenizer, p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_equals_sequential_generate(tiny_llama, word_tokenizer, prompts, reference,
                                            batch_size):
    got = generate_greedy(tiny_llama, word_tokenizer, prompts, max_new_tokens=MAX_NEW,
                          batch_size=batch_size)
    assert got == reference


def test_reference_is_not_degenerate(prompts, reference, word_tokenizer):
    # The equality test only means something if outputs differ, some rows end at eos before
    # the budget and prompts have different lengths.
    assert len(set(reference)) > len(reference) // 2
    assert any(len(r.split()) < MAX_NEW for r in reference)
    assert len({len(word_tokenizer(p)["input_ids"]) for p in prompts}) > 5


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_stop_strings_cut_the_output(tiny_llama, word_tokenizer, prompts, reference, batch_size):
    stops = [";", "cat", "zero"]
    got = generate_greedy(tiny_llama, word_tokenizer, prompts, max_new_tokens=MAX_NEW,
                          batch_size=batch_size, stop_strings=stops)
    expected = [_cut(r, stops) for r in reference]
    assert got == expected
    assert sum(e != r for e, r in zip(expected, reference)) >= 2  # stops were really hit


def test_stops_early_when_every_row_has_finished(tiny_llama, word_tokenizer, prompts):
    # With every word a stop string, a row finishes at its first non-special token (or eos):
    # the batch must take exactly as many forward passes as its slowest row needs.
    stops = VOCAB
    needed = []
    for prompt in prompts:
        encoded = word_tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = tiny_llama.generate(**encoded, do_sample=False, max_new_tokens=MAX_NEW)
        tokens = out[0, encoded["input_ids"].shape[1]:].tolist()
        steps = next((i + 1 for i, t in enumerate(tokens)
                      if t == word_tokenizer.eos_token_id or word_tokenizer.decode([t],
                      skip_special_tokens=True)), len(tokens))
        needed.append(steps)
    calls = []
    handle = tiny_llama.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        got = generate_greedy(tiny_llama, word_tokenizer, prompts, max_new_tokens=MAX_NEW,
                              batch_size=64, stop_strings=stops)
    finally:
        handle.remove()
    assert got == [""] * len(prompts)
    assert len(calls) == max(needed) < MAX_NEW


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_match_generate(word_tokenizer, words, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=len(words), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=0.2)
    if arch == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      **common)
    else:
        config = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, **common)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = _prompts(6, seed=3)
    expected = [_reference(model, word_tokenizer, p, 5) for p in prompts]
    assert generate_greedy(model, word_tokenizer, prompts, max_new_tokens=5, batch_size=4) == expected


def test_progress_and_order(tiny_llama, word_tokenizer, prompts, reference):
    events = []
    got = generate_greedy(tiny_llama, word_tokenizer, list(reversed(prompts)),
                          max_new_tokens=MAX_NEW, batch_size=5,
                          progress=lambda stage, done, total: events.append((stage, done, total)))
    assert got == list(reversed(reference))
    assert events[0] == ("generate", 0, len(prompts))
    assert events[-1] == ("generate", len(prompts), len(prompts))
    assert [done for _, done, _ in events] == sorted(done for _, done, _ in events)


def test_edge_cases(tiny_llama, word_tokenizer):
    assert generate_greedy(tiny_llama, word_tokenizer, [], max_new_tokens=4) == []
    assert generate_greedy(tiny_llama, word_tokenizer, ["one two"], max_new_tokens=0) == [""]
    with pytest.raises(ValueError):
        generate_greedy(tiny_llama, word_tokenizer, ["one"], max_new_tokens=2, batch_size=0)


def test_another_seed_model_differs(word_tokenizer, llama_factory, prompts, reference):
    # Guards against a generator that ignores the model.
    other = llama_factory(seed=5)
    got = generate_greedy(other, word_tokenizer, prompts, max_new_tokens=MAX_NEW)
    assert got != reference


class _OpaqueCache:
    """A cache object that cannot drop rows (no ``batch_select_indices``)."""

    def __init__(self, inner):
        self.inner = inner


class _NoCompactionModel(torch.nn.Module):
    """Wraps a model so that its cache is opaque, as some custom architectures' caches are."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.generation_config = inner.generation_config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0):
        cache = past_key_values.inner if past_key_values is not None else None
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=use_cache,
                         logits_to_keep=logits_to_keep)
        out.past_key_values = _OpaqueCache(out.past_key_values)
        return out


def test_finished_rows_ride_along_when_the_cache_cannot_drop_rows(tiny_llama, word_tokenizer,
                                                                  prompts, reference):
    wrapped = _NoCompactionModel(tiny_llama)
    stops = [";", "cat"]
    got = generate_greedy(wrapped, word_tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=5,
                          stop_strings=stops)
    assert got == [_cut(r, stops) for r in reference]


def _count_batch_sizes(model):
    sizes: list[int] = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    return sizes, handle


def test_a_row_that_meets_a_near_tie_is_regenerated_alone(tiny_llama, word_tokenizer, prompts,
                                                          reference, monkeypatch):
    import shoal.eval.generation as generation

    real = generation._near_ties
    # Pretend that the first row of every batch meets a near tie.
    monkeypatch.setattr(generation, "_near_ties", lambda logits: [True] + [False] * (len(logits) - 1))
    sizes, handle = _count_batch_sizes(tiny_llama)
    try:
        got = generate_greedy(tiny_llama, word_tokenizer, prompts, max_new_tokens=MAX_NEW,
                              batch_size=5)
    finally:
        handle.remove()
    assert got == reference
    assert sizes.count(1) >= 3  # one regeneration per batch of 5 (14 prompts: 3 batches)

    # Flat logits (every row ties): the batched answers are kept, nothing runs alone.
    monkeypatch.setattr(generation, "_near_ties", lambda logits: [True] * len(logits))
    sizes, handle = _count_batch_sizes(tiny_llama)
    try:
        got = generate_greedy(tiny_llama, word_tokenizer, prompts, max_new_tokens=MAX_NEW,
                              batch_size=5)
    finally:
        handle.remove()
    assert got == reference and 1 not in sizes

    monkeypatch.setattr(generation, "_near_ties", real)
    logits = torch.tensor([[1.0, 3.0, 3.0 - 1e-7, 0.0], [1.0, 3.0, 2.0, 0.0]])
    assert real(logits) == [True, False]
    assert real(logits.to(torch.bfloat16)) is None

