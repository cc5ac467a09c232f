"""Tensor names -> (prefix, layer, role) on the real names of every known family, and prefix mapping."""

from __future__ import annotations

import pytest
import torch

from shoal.checkpoint import (
    describe_tensor,
    is_tied,
    layer_count_key,
    map_prefix,
    num_layers,
    open_checkpoint,
    with_layer,
)
from shoal.errors import CheckpointError

LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
FAMILY_CONFIGS = {
    "llama": dict(LLAMA_LIKE),
    "mistral": dict(LLAMA_LIKE),
    "qwen2": dict(LLAMA_LIKE),
    "qwen3": dict(LLAMA_LIKE, head_dim=8),
    "gemma": dict(LLAMA_LIKE, head_dim=8),
    "gemma2": dict(LLAMA_LIKE, head_dim=8),
    "phi3": dict(LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0),
}

# The reference: every module path inside a decoder layer that these families use, by role.
LAYER_MODULE_ROLES = {
    "self_attn.q_proj": "attention", "self_attn.k_proj": "attention", "self_attn.v_proj": "attention",
    "self_attn.o_proj": "attention", "self_attn.qkv_proj": "attention",
    "self_attn.q_norm": "norm", "self_attn.k_norm": "norm",
    "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "mlp", "mlp.gate_up_proj": "mlp",
    "input_layernorm": "norm", "post_attention_layernorm": "norm",
    "pre_feedforward_layernorm": "norm", "post_feedforward_layernorm": "norm",
    "attn.c_attn": "attention", "attn.c_proj": "attention", "mlp.c_fc": "mlp", "mlp.c_proj": "mlp",
    "ln_1": "norm", "ln_2": "norm",
}
OUTER_ROLES = {
    "model.embed_tokens.weight": ("model.", "embed"),
    "model.norm.weight": ("model.", "norm"),
    "lm_head.weight": ("", "lm_head"),
    "transformer.wte.weight": ("transformer.", "embed"),
    "transformer.wpe.weight": ("transformer.", "embed"),
    "transformer.ln_f.weight": ("transformer.", "norm"),
    "transformer.ln_f.bias": ("transformer.", "norm"),
}


def family_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **FAMILY_CONFIGS[model_type])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, list(model.state_dict())


def expected(name: str) -> tuple[str, int | None, str]:
    parts = name.split(".")
    if parts[0] in ("model", "transformer") and parts[1] in ("layers", "h"):
        module = ".".join(parts[3:-1])
        return parts[0] + ".", int(parts[2]), LAYER_MODULE_ROLES[module]
    prefix, role = OUTER_ROLES[name]
    return prefix, None, role


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("named", [True, False], ids=["known-architecture", "generic-rules"])
def test_describe_tensor_on_real_names(model_type, named):
    config, names = family_model(model_type)
    architecture = config.architectures[0] if named and config.architectures else (model_type if named else None)
    layers_seen = set()
    for name in names:
        info = describe_tensor(name, architecture)
        assert (info.name, info.prefix, info.layer, info.role) == (name, *expected(name)), name
        layers_seen.add(info.layer)
    assert layers_seen == {None, 0, 1, 2}

    stack = [n for n in names if describe_tensor(n).layer == 0]
    for name in stack:
        for target in range(3):
            moved = with_layer(name, target)
            assert moved in names and describe_tensor(moved).layer == target
            assert moved.replace(f".{target}.", ".0.", 1) == name
    assert num_layers(config.to_dict()) == 3
    assert layer_count_key(config.to_dict()) == ("n_layer" if model_type == "gpt2" else "num_hidden_layers")


def test_describe_tensor_with_architecture_class_names():
    assert describe_tensor("model.layers.7.mlp.down_proj.weight", "Qwen2ForCausalLM").role == "mlp"
    assert describe_tensor("transformer.h.4.mlp.c_proj.bias", "GPT2LMHeadModel").role == "mlp"
    assert describe_tensor("transformer.h.4.attn.c_proj.bias", "gpt2").role == "attention"


@pytest.mark.parametrize(
    "name, prefix, layer, role",
    [
        ("backbone.blocks.5.attention.wqkv.weight", "backbone.", 5, "attention"),
        ("backbone.blocks.5.feed_forward.w2.weight", "backbone.", 5, "mlp"),
        ("backbone.blocks.5.attention_norm.weight", "backbone.", 5, "norm"),
        ("gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.", 0, "attention"),
        ("gpt_neox.layers.11.mlp.dense_h_to_4h.bias", "gpt_neox.", 11, "mlp"),
        ("gpt_neox.embed_in.weight", "gpt_neox.", None, "embed"),
        ("gpt_neox.final_layer_norm.weight", "gpt_neox.", None, "norm"),
        ("embed_out.weight", "", None, "lm_head"),
        ("model.layers.2.block_sparse_moe.experts.7.w1.weight", "model.", 2, "mlp"),
        ("model.layers.2.mixer.weird.weight", "model.", 2, "other"),
        ("rwkv.blocks.3.ln1.weight", "rwkv.", 3, "norm"),
        ("encoder.layer.4.output.LayerNorm.weight", "encoder.", 4, "norm"),
        ("something.else.entirely", "", None, "other"),
    ],
)
def test_generic_fallback(name, prefix, layer, role):
    info = describe_tensor(name, "SomeNewArchForCausalLM")
    assert (info.prefix, info.layer, info.role) == (prefix, layer, role)


def test_with_layer_rejects_tensors_outside_the_stack():
    with pytest.raises(ValueError, match="lm_head"):
        with_layer("lm_head.weight", 1)
    assert with_layer("language_model.model.layers.10.mlp.up_proj.weight", 3) == (
        "language_model.model.layers.3.mlp.up_proj.weight"
    )


def test_layer_count_of_nested_and_missing_configs():
    llava = {"model_type": "llava", "text_config": {"num_hidden_layers": 5}, "vision_config": {"num_hidden_layers": 2}}
    assert (num_layers(llava), layer_count_key(llava)) == (5, "text_config.num_hidden_layers")
    with pytest.raises(CheckpointError, match="some/config.json.*num_hidden_layers"):
        num_layers({"model_type": "x"}, source="some/config.json")


def test_is_tied(tiny_model_dir):
    for arch, tied in [("llama", False), ("qwen2", True), ("gpt2", True), ("mistral", False)]:
        reader = open_checkpoint(tiny_model_dir(f"arch-{arch}", arch=arch))
        names = reader.tensor_names()
        assert is_tied(reader.config, names) is tied, arch
        assert ("lm_head.weight" in names) is (not tied), arch  # transformers saves tied heads once
    untied_names = ["model.embed_tokens.weight", "lm_head.weight"]
    assert is_tied({"model_type": "gemma"}, untied_names) is True  # gemma's default ties
    assert is_tied({"model_type": "llama"}, untied_names) is False
    assert is_tied({"model_type": "llama", "tie_word_embeddings": True}, untied_names) is True
    assert is_tied(None, ["model.embed_tokens.weight"]) is True  # no head at all
    assert is_tied({"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": False}},
                   ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight"]) is False


def test_prefix_mapping_on_a_vision_language_checkpoint(tiny_llava_dir, tiny_model_dir):
    llava = open_checkpoint(tiny_llava_dir)
    llama = open_checkpoint(tiny_model_dir("arch-llama", arch="llama"))
    mapping = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}

    mapped = {name: map_prefix(name, mapping) for name in llava.tensor_names()}
    language = {old: new for old, new in mapped.items() if new is not None}
    untouched = sorted(old for old, new in mapped.items() if new is None)
    # The language model lines up with the plain LLM name for name and shape ...
    assert sorted(language.values()) == sorted(llama.tensor_names())
    for old, new in language.items():
        assert llava.shape(old) == llama.shape(new)
        assert describe_tensor(old).role == describe_tensor(new).role
        assert describe_tensor(old).layer == describe_tensor(new).layer
    # ... while the vision tower and projector map to nothing and are copied unchanged.
    assert untouched and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in untouched)
    assert describe_tensor("language_model.model.layers.1.self_attn.q_proj.weight").prefix == "language_model.model."

    reverse = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
    assert all(map_prefix(new, reverse) == old for old, new in language.items())
    assert map_prefix("model.layers.0.x", {"": "p.", "model.": "m."}) == "m.layers.0.x"  # longest wins
    assert map_prefix("model.layers.0.x", {"": "p."}) == "p.model.layers.0.x"
