"""What a tensor name means: module prefix, decoder layer index, and role.

Hugging Face decoder checkpoints name tensors ``<prefix><stack>.<layer>.<module path>``
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn.weight``) plus
a few tensors outside the stack (embeddings, final norm, ``lm_head``). The families shoal
knows by name (Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2, Phi-3, GPT-2, LLaVA) have tables of
their module names; any other architecture falls back to the same rules applied to
generic names (``.layers.N.``, ``.h.N.``, ``.blocks.N.``, ``*_proj``, ``*norm``, ...).

Vision-language models (LLaVA) hold a language model plus vision modules: the vision tower
and the projector have the role ``vision`` and no decoder layer (their own encoder layers are
not the language model's), so per-layer parameters address the language model only. Their
names come in two spellings, both recognised: on disk (``language_model.model.layers.N...``,
``language_model.lm_head``, ``vision_tower...``, ``multi_modal_projector...``) and in memory in
transformers 5 (``model.language_model.layers.N...``, ``lm_head``, ``model.vision_tower...``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.errors import CheckpointError

ROLES = ("embed", "attention", "mlp", "norm", "lm_head", "vision", "other")

# The first `<stack>.<N>.` in a name is the decoder stack; later ones (experts.N) are inside a layer.
_LAYER = re.compile(r"(?:^|(?<=\.))(?:layers|layer|h|blocks|block)\.(\d+)\.")

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
NESTED_CONFIG_KEYS = ("text_config", "language_config", "llm_config")


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family, by role, and where transformers implements it.

    ``modeling_module`` and ``class_prefix`` name the transformers module and the prefix of its
    classes (``LlamaDecoderLayer``, ``LlamaRMSNorm``, ``LlamaRotaryEmbedding``); ``layer_path``
    says whether a layer-path (data-flow) model may be built from its decoder layers.
    """

    name: str
    attention: frozenset[str]
    mlp: frozenset[str]
    norms: frozenset[str]
    embeddings: frozenset[str]
    heads: frozenset[str]
    final_norms: frozenset[str]
    modeling_module: str = ""
    class_prefix: str = ""
    layer_path: bool = False
    # mergekit's ``modules:`` names of a multi-module model -> the tensor-name prefixes of each
    # (both spellings); empty for single-module models
    modules: tuple[tuple[str, tuple[str, ...]], ...] = ()


_LLAMA_LIKE = dict(
    attention=frozenset({"self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"}),
    mlp=frozenset({"mlp", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}),
    norms=frozenset(
        {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "post_feedforward_layernorm", "q_norm", "k_norm"}
    ),
    embeddings=frozenset({"embed_tokens"}),
    heads=frozenset({"lm_head"}),
    final_norms=frozenset({"norm"}),
)

# model_type -> (transformers class prefix, whether layer paths may use its decoder layers)
_LLAMA_LIKE_FAMILIES = {"llama": ("Llama", True), "mistral": ("Mistral", True), "qwen2": ("Qwen2", True),
                        "qwen3": ("Qwen3", True), "gemma": ("Gemma", False), "gemma2": ("Gemma2", False),
                        "phi3": ("Phi3", False)}

FAMILIES: dict[str, Family] = {
    name: Family(name=name, **_LLAMA_LIKE, modeling_module=f"transformers.models.{name}.modeling_{name}",
                 class_prefix=prefix, layer_path=layer_path)
    for name, (prefix, layer_path) in _LLAMA_LIKE_FAMILIES.items()
}
FAMILIES["gpt2"] = Family(
    name="gpt2",
    attention=frozenset({"attn", "c_attn"}),
    mlp=frozenset({"mlp", "c_fc"}),
    norms=frozenset({"ln_1", "ln_2"}),
    embeddings=frozenset({"wte", "wpe"}),
    heads=frozenset({"lm_head"}),
    final_norms=frozenset({"ln_f"}),
    modeling_module="transformers.models.gpt2.modeling_gpt2",
    class_prefix="GPT2",
)

# Vision-language models: a Llama-like language model (the zoo's, LLaVA-1.5's, Mistral 3's) behind a
# vision tower and projector; the module names are mergekit's (its mistral3.json).
_VLM_MODULES = (("text_decoder", ("language_model.", "model.language_model.", "lm_head.")),
                ("vision_tower", ("vision_tower.", "model.vision_tower.")),
                ("multi_modal_projector", ("multi_modal_projector.", "model.multi_modal_projector.")))
for _name, _prefix in (("llava", "Llava"), ("mistral3", "Mistral3")):
    FAMILIES[_name] = Family(name=_name, **_LLAMA_LIKE, modeling_module=f"transformers.models.{_name}.modeling_{_name}",
                             class_prefix=_prefix, modules=_VLM_MODULES)

# Top-level modules of vision-language models that are not the language model (after an
# optional ``model.``): LLaVA and its kin, Qwen-VL (``visual``), Idefics/SigLIP-style (``vision_model``).
VISION_MODULES = ("vision_tower", "multi_modal_projector", "vision_model", "visual", "mm_projector",
                  "vision_resampler")
_VISION = re.compile(r"^((?:model\.)?(?:" + "|".join(VISION_MODULES) + r")\.)")

# transformers class names -> family; model_type strings map to themselves.
_ARCHITECTURE_CLASSES = {
    "LlavaForConditionalGeneration": "llava",
    "Mistral3ForConditionalGeneration": "mistral3",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
}

# Generic rules for architectures without a table.
_GENERIC_ATTENTION = ("attn", "attention", "self_attn", "self_attention", "q_proj", "k_proj", "v_proj",
                      "o_proj", "qkv_proj", "query_key_value", "c_attn", "wqkv", "out_proj")
_GENERIC_MLP = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "gate_proj", "up_proj",
                "down_proj", "gate_up_proj", "c_fc", "fc1", "fc2", "w1", "w2", "w3")
_GENERIC_EMBED = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                  "embed_positions", "embeddings", "embed_in", "tok_embeddings")
_GENERIC_HEAD = ("lm_head", "embed_out")
_GENERIC_FINAL_NORM = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor sits in the model: ``prefix`` is the module path before the decoder
    stack (``"model."``, ``"transformer."``, ``"language_model.model."``; for tensors outside
    the stack, the path before the known module, e.g. ``""`` for ``lm_head.weight``);
    ``layer`` is the decoder layer index or None; ``role`` is one of :data:`ROLES`."""

    name: str
    prefix: str
    layer: int | None
    role: str


def layer_path_families() -> dict[str, tuple[str, str]]:
    """``model_type -> (transformers module, class-name prefix)`` of the families whose decoder
    layers a layer-path model may use."""
    return {name: (f.modeling_module, f.class_prefix) for name, f in FAMILIES.items() if f.layer_path}


def family_of(architecture: str | None) -> Family | None:
    """The known family for a ``model_type`` (``"qwen2"``) or class name (``"Qwen2ForCausalLM"``)."""
    if architecture is None:
        return None
    key = _ARCHITECTURE_CLASSES.get(architecture, architecture.lower())
    return FAMILIES.get(key)


def _is_norm(module: str) -> bool:
    lowered = module.lower()
    return lowered.endswith(("norm", "layernorm", "layrnorm")) or "layer_norm" in lowered or bool(
        re.fullmatch(r"ln(_\w+)?\d*", lowered)
    )


def _layer_role(modules: list[str], family: Family | None) -> str:
    """Role of a tensor inside a decoder layer from its module path (parameter name dropped)."""
    if family is not None:
        for module in reversed(modules):
            if module in family.norms:
                return "norm"
        for module in modules:
            if module in family.attention:
                return "attention"
            if module in family.mlp:
                return "mlp"
    if modules and _is_norm(modules[-1]):
        return "norm"
    for module in modules:
        if module in _GENERIC_ATTENTION:
            return "attention"
        if module in _GENERIC_MLP:
            return "mlp"
    return "other"


def _outer_role(modules: list[str], family: Family | None) -> tuple[str, int] | None:
    """Role of a tensor outside the decoder stack and how many leading modules form its prefix."""
    heads = family.heads if family else _GENERIC_HEAD
    embeddings = family.embeddings if family else _GENERIC_EMBED
    final_norms = family.final_norms if family else _GENERIC_FINAL_NORM
    for depth, module in enumerate(modules):
        if module in heads:
            return "lm_head", depth
        if module in embeddings:
            return "embed", depth
    if modules and (modules[-1] in final_norms or (family is None and _is_norm(modules[-1]))):
        return "norm", len(modules) - 1
    if family is not None:
        return _outer_role(modules, None)
    return None


def describe_tensor(name: str, architecture: str | None = None) -> TensorInfo:
    """Module prefix, layer index and role of tensor ``name``.

    ``architecture`` is a ``model_type`` or transformers class name; when it is unknown or
    None the generic rules apply, which cover the known families too.
    """
    family = family_of(architecture)
    vision = _VISION.match(name)
    if vision is not None:
        return TensorInfo(name, vision.group(1), None, "vision")
    match = _LAYER.search(name)
    if match is not None:
        inner = name[match.end():].split(".")[:-1]  # module path inside the layer
        return TensorInfo(name, name[: match.start()], int(match.group(1)), _layer_role(inner, family))
    modules = name.split(".")[:-1]
    outer = _outer_role(modules, family)
    if outer is None:
        return TensorInfo(name, "", None, "other")
    role, depth = outer
    prefix = "".join(m + "." for m in modules[:depth])
    return TensorInfo(name, prefix, None, role)


def module_of(name: str, architecture: str | None) -> str | None:
    """The mergekit module (``text_decoder``, ``vision_tower``, ...) of tensor ``name`` in a
    multi-module family, or None when the family has no modules or none holds the name."""
    family = family_of(architecture)
    if family is None:
        return None
    best: tuple[int, str] | None = None
    for module, prefixes in family.modules:
        for prefix in prefixes:
            if name.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), module)
    return best[1] if best else None


def with_layer(name: str, layer: int) -> str:
    """``name`` moved to decoder layer ``layer`` (``model.layers.3.x`` -> ``model.layers.{layer}.x``)."""
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"tensor {name!r} is not inside a decoder layer")
    if layer < 0:
        raise ValueError(f"layer index must be >= 0, got {layer}")
    start, end = match.span(1)
    return f"{name[:start]}{layer}{name[end:]}"


def _layer_count_path(config: dict) -> tuple[str, ...] | None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return (key,)
    for nested in NESTED_CONFIG_KEYS:
        section = config.get(nested)
        if isinstance(section, dict):
            for key in LAYER_COUNT_KEYS:
                if isinstance(section.get(key), int):
                    return (nested, key)
    return None


def layer_count_key(config: dict, *, source: str = "config.json") -> str:
    """The (dotted, for nested text configs) key holding the decoder layer count."""
    path = _layer_count_path(config)
    if path is None:
        tried = ", ".join(LAYER_COUNT_KEYS)
        raise CheckpointError(
            f"{source}: no decoder layer count found (tried {tried}, also under {', '.join(NESTED_CONFIG_KEYS)})"
        )
    return ".".join(path)


def num_layers(config: dict, *, source: str = "config.json") -> int:
    """Number of decoder layers the config declares (``num_hidden_layers``, ``n_layer``, ...)."""
    section: object = config
    for part in layer_count_key(config, source=source).split("."):
        section = section[part]  # type: ignore[index]
    return int(section)  # type: ignore[arg-type]


def _default_tied(model_type: str | None) -> bool:
    """transformers' default ``tie_word_embeddings`` for a model type (True if unknown)."""
    if model_type:
        try:
            from transformers import CONFIG_MAPPING

            return bool(getattr(CONFIG_MAPPING[model_type], "tie_word_embeddings", True))
        except (KeyError, ImportError, AttributeError):
            pass
    return True


def is_tied(config: dict | None, tensor_names: Iterable[str]) -> bool:
    """Whether the output head shares the input embedding.

    True when the config says ``tie_word_embeddings`` (or the model type defaults to it
    when the key is absent), or when the checkpoint has an input embedding but no
    ``lm_head`` tensor.
    """
    names = list(tensor_names)
    roles = {describe_tensor(n).role for n in names}
    if "embed" in roles and "lm_head" not in roles:
        return True
    if not config:
        return False
    # A vision-language config's text section governs its language model's head.
    for section in (*(config.get(k) for k in NESTED_CONFIG_KEYS), config):
        if isinstance(section, dict) and "tie_word_embeddings" in section:
            return bool(section["tie_word_embeddings"])
    return _default_tied(config.get("model_type"))


def map_prefix(name: str, mapping: dict[str, str]) -> str | None:
    """Rewrite the start of ``name`` by the longest matching prefix in ``mapping``; None if none matches.

    ``{"language_model.model.": "model."}`` turns ``language_model.model.layers.0.mlp.up_proj.weight``
    into ``model.layers.0.mlp.up_proj.weight``; ``vision_tower.*`` names return None.
    """
    best = None
    for old in mapping:
        if name.startswith(old) and (best is None or len(old) > len(best)):
            best = old
    if best is None:
        return None
    return mapping[best] + name[len(best):]
