"""The layer-path runtime against the source models it is built from."""

from __future__ import annotations

import pytest
import torch

import shoal  # noqa: F401  (registers the architecture)
from shoal.errors import ConfigError
from shoal.flow.build import build_path_model
from shoal.flow.path import identity_path, make_path

PROMPTS = ["what is two plus two ?", "cat", "red blue green yes no . the a", "one", "dog is"]


def load_plain(folder, attn="sdpa"):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()


def padded_batch(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def greedy_without_cache(model, tokenizer, prompt, max_new_tokens):
    """One prompt, no padding, the whole sequence recomputed at every step."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return out


def test_identity_path_reproduces_the_source_exactly(word_sources, word_tokenizer):
    a, b = word_sources
    source = load_plain(a)
    model = build_path_model([a, b], identity_path(3, model=0))
    ids, mask = padded_batch(word_tokenizer, PROMPTS)
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    # generate: batched, left padded, with the KV cache
    want = source.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    have = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert have.tolist() == want.tolist()


def reference_logits(plain_models, hops, ids):
    """The path by hand: the first model's embeddings, rotary and head; hop k runs
    ``layers[layer](scale * h)`` of its model, called directly, with an explicit causal mask."""
    first = plain_models[0]
    length = ids.shape[1]
    positions = torch.arange(length)[None]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        h = first.model.embed_tokens(ids)
        rope = first.model.rotary_emb(h, positions)
        for model, layer, scale in hops:
            h = plain_models[model].model.layers[layer](scale * h, attention_mask=causal,
                                                        position_embeddings=rope, position_ids=positions)
        return first.lm_head(first.model.norm(h))


def test_scales_multiply_the_input_of_each_hop(word_sources, word_tokenizer):
    """h1 = A.layer0(1.5 h0); h2 = B.layer2(0.7 h1); logits = A.head(A.norm(h2))."""
    a, b = word_sources
    plain = [load_plain(a, "eager"), load_plain(b, "eager")]
    hops = [(0, 0, 1.5), (1, 2, 0.7)]
    model = build_path_model([a, b], make_path(hops))
    ids, _ = padded_batch(word_tokenizer, ["what is two plus two ?"])
    expected = reference_logits(plain, hops, ids)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(reference_logits(plain, [(0, 0, 1.0), (1, 2, 1.0)], ids), expected, atol=1e-3)
    assert not torch.allclose(reference_logits(plain, [(1, 2, 0.7), (0, 0, 1.5)], ids), expected, atol=1e-3)


def test_the_second_models_layers_under_the_first_models_ends(word_sources, word_tokenizer):
    a, b = word_sources
    plain = [load_plain(a, "eager"), load_plain(b, "eager")]
    hops = [(1, 0, 1.0), (1, 1, 1.0), (1, 2, 1.0), (0, 1, 0.8)]
    model = build_path_model([a, b], make_path(hops))
    ids, _ = padded_batch(word_tokenizer, PROMPTS[:1])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, reference_logits(plain, hops, ids), atol=1e-5)


def test_repeated_layers_get_their_own_cache_slots(word_sources, word_tokenizer):
    """Batched left-padded generation with the KV cache equals step-by-step recomputation."""
    from shoal.eval.generation import generate_greedy

    a, b = word_sources
    path = make_path([(0, 0), (0, 1), (0, 1, 0.9), (1, 2), (1, 0, 1.2), (0, 1), (0, 2)])
    model = build_path_model([a, b], path)
    assert len(model.model.blocks) == 5  # each distinct layer stored once
    expected = [word_tokenizer.decode(greedy_without_cache(model, word_tokenizer, p, 6),
                                      skip_special_tokens=True) for p in PROMPTS]
    got = generate_greedy(model, word_tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    assert got == expected
    assert len(set(expected)) > 1  # the outputs depend on the prompt
    ids, mask = padded_batch(word_tokenizer, PROMPTS)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    texts = [word_tokenizer.decode([t for t in row[ids.shape[1]:].tolist() if t != 2][:6], skip_special_tokens=True)
             for row in generated]
    for text, want in zip(texts, expected):
        assert text.startswith(want)


def test_set_path_switches_paths_over_all_stored_layers(word_sources, word_tokenizer, tmp_path):
    a, b = word_sources
    first = make_path([(0, 0), (1, 1), (0, 2)])
    second = make_path([(0, 0), (1, 2, 0.5), (1, 1), (0, 1), (0, 2)])
    model = build_path_model([a, b], first, keep="all")
    assert len(model.model.blocks) == 6
    ids, mask = padded_batch(word_tokenizer, PROMPTS)
    model.set_path(second)
    assert model.config.num_hidden_layers == 5
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        expected = build_path_model([a, b], second)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    small = build_path_model([a, b], first)
    with pytest.raises(ValueError, match="not stored"):  # the standalone runtime knows no ShoalError
        small.set_path(second)
    # saving keeps only the layers the current path uses: (0,0), (1,2), (1,1), (0,1), (0,2)
    from transformers import AutoModelForCausalLM

    from shoal.flow.build import save_path_model

    loaded = AutoModelForCausalLM.from_pretrained(save_path_model(model, tmp_path / "saved"))
    assert loaded.config.layers == [[0, 0], [1, 2], [1, 1], [0, 1], [0, 2]]
    assert len(model.model.blocks) == 6  # the model itself is untouched
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_bad_paths_and_sources_are_user_errors(word_sources, tiny_model_dir):
    a, b = word_sources
    with pytest.raises(ConfigError, match="layer 3 does not exist"):
        build_path_model([a, b], make_path([(0, 0), (1, 3)]))
    with pytest.raises(ConfigError, match="model 2 does not exist"):
        build_path_model([a, b], make_path([(2, 0)]))
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        build_path_model([a, tiny_model_dir("g", "gpt2")], make_path([(0, 0)]))


def test_dfs_candidates_on_one_resident_model(word_sources, word_tokenizer):
    """How a DFS search uses the runtime: every layer resident once, one path per genome."""
    import random

    from shoal.flow.build import source_layer_counts
    from shoal.flow.genome import DfsLayout, DfsSpace

    a, b = word_sources
    space = DfsSpace(DfsLayout(source_layer_counts([a, b]), repeats=2, max_hops=8))
    resident = build_path_model([a, b], space.decode(space.default_genome()), keep="all")
    ids, mask = padded_batch(word_tokenizer, PROMPTS)
    with torch.no_grad():
        source = load_plain(a)(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(resident(input_ids=ids, attention_mask=mask).logits, source)
        rng = random.Random(0)
        for _ in range(2):
            path = space.decode({k: rng.random() for k in space.keys})
            resident.set_path(path)
            fresh = build_path_model([a, b], path)
            assert torch.equal(resident(input_ids=ids, attention_mask=mask).logits,
                               fresh(input_ids=ids, attention_mask=mask).logits)
