"""The layer-path runtime: a transformers causal LM whose decoder runs a path of hops.

Hop ``k`` runs stored layer ``(model, layer)`` on ``scale_k * h`` (config.json's ``path``).
Embeddings, final norm, head and rotary embedding come from the first source model. Each hop
has its own KV-cache slot (slot ``k`` of a ``DynamicCache``), also when the path runs the same
stored layer several times, so ``generate``, batched left-padded generation and
evaluation loops work as with any decoder.

Supported sources: the Llama family of transformers decoders (Llama, Mistral, Qwen2, Qwen3)
without sliding-window attention, all of one hidden size and head size.

This file is written into every saved layer-path folder (``auto_map`` names it), so it loads
with ``trust_remote_code=True`` where shoal is not installed: it imports only torch,
transformers and its sibling ``configuration_layer_path``, and it tolerates the transformers
releases before and after 5.24's renaming of ``past_key_values`` to ``cache``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_layer_path import LayerPathConfig


class LayerPathError(ValueError):
    """A layer-path config or path this runtime cannot run (shoal reports it as a ConfigError)."""


@functools.lru_cache(maxsize=1)
def cache_field() -> str:
    """The field of model outputs that holds the KV cache: ``cache`` from transformers 5.24 on."""
    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@functools.lru_cache(maxsize=None)
def _declared(fn: Callable[..., Any], names: tuple[str, ...]) -> str | None:
    parameters = inspect.signature(fn).parameters
    return next((name for name in names if name in parameters), None)


def cache_keyword(fn: Callable[..., Any]) -> str:
    """The name ``fn`` declares for the cache; a decoder layer called directly ignores the other."""
    return _declared(getattr(fn, "__func__", fn), ("cache", "past_key_values")) or cache_field()


def embeds_keyword(fn: Callable[..., Any]) -> str:
    """``create_causal_mask`` takes ``inputs_embeds`` in transformers 5, ``input_embeds`` in 4.x."""
    return _declared(fn, ("inputs_embeds", "input_embeds")) or "inputs_embeds"


# model_type -> (module, class-name prefix) of the transformers decoders a path may use.
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3"),
}


@dataclass(frozen=True)
class FamilyClasses:
    decoder_layer: type
    norm: type
    rotary: type


def family_classes(model_type: str, *, source: str = "source") -> FamilyClasses:
    """The decoder-layer, norm and rotary-embedding classes of a supported ``model_type``."""
    if model_type not in FAMILIES:
        raise LayerPathError(f"{source}: model_type {model_type!r} cannot be used in a layer path "
                              f"(supported: {', '.join(FAMILIES)})")
    module_name, prefix = FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return FamilyClasses(getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}RMSNorm"),
                         getattr(module, f"{prefix}RotaryEmbedding"))


def source_config(data: dict, *, source: str = "source") -> Any:
    """A transformers config object for one source's config dict."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise LayerPathError(f"{source}: config has no model_type")
    family_classes(model_type, source=source)
    fields = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version")}
    config = AutoConfig.for_model(model_type, **fields)
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise LayerPathError(f"{source}: sliding-window attention is not supported in a layer path "
                              f"(sliding_window={config.sliding_window})")
    return config


def _new_cache(config: LayerPathConfig) -> Cache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # pragma: no cover - releases whose DynamicCache takes no config
        return DynamicCache()


class _HopCache:
    """The KV cache as one hop sees it: writes go to the hop's own slot.

    A stored layer knows only its index in its source model; a path can run it several times,
    and every run needs its own keys and values.
    """

    __slots__ = ("cache", "hop")

    def __init__(self, cache: Cache, hop: int):
        self.cache = cache
        self.hop = hop

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> Any:
        return self.cache.update(key_states, value_states, self.hop, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


def _as_hop(hop: Any) -> tuple[int, int, float]:
    if hasattr(hop, "model") and hasattr(hop, "layer"):
        return int(hop.model), int(hop.layer), float(getattr(hop, "scale", 1.0))
    items = list(hop)
    if len(items) not in (2, 3):
        raise LayerPathError(f"a hop is [model, layer] or [model, layer, scale], got {items}")
    return int(items[0]), int(items[1]), (float(items[2]) if len(items) == 3 else 1.0)


class LayerPathPreTrainedModel(PreTrainedModel):
    config: LayerPathConfig
    config_class = LayerPathConfig
    base_model_prefix = "model"
    _no_split_modules = [f"{prefix}DecoderLayer" for _, prefix in FAMILIES.values()]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class LayerPathModel(LayerPathPreTrainedModel):
    """Embeddings, the stored layer table, final norm; ``forward`` runs the path."""

    def __init__(self, config: LayerPathConfig):
        super().__init__(config)
        if not config.source_configs or not config.layers or not config.path:
            raise LayerPathError("a layer-path config needs 'source_configs', 'layers' and 'path'")
        names = config.sources or [f"model {i}" for i in range(len(config.source_configs))]
        self.source_configs = [source_config(c, source=names[i]) for i, c in enumerate(config.source_configs)]
        base = self.source_configs[0]
        classes = family_classes(base.model_type)
        self.embed_tokens = nn.Embedding(base.vocab_size, base.hidden_size, base.pad_token_id)
        blocks = []
        for model, layer in config.layers:
            cfg = self.source_configs[model]
            if cfg.hidden_size != base.hidden_size:
                raise LayerPathError(f"{names[model]}: hidden size {cfg.hidden_size} differs from "
                                      f"{names[0]}'s {base.hidden_size}")
            blocks.append(family_classes(cfg.model_type).decoder_layer(cfg, layer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = classes.norm(base.hidden_size, eps=base.rms_norm_eps)
        self.rotary_emb = classes.rotary(config=base)
        self.table = {(int(m), int(layer)): k for k, (m, layer) in enumerate(config.layers)}
        self.set_path(config.path)
        self.post_init()

    def set_path(self, path: Iterable[Any]) -> None:
        """Run ``path`` from now on: hops as ``[model, layer, scale]`` lists or objects with
        ``model``, ``layer`` and ``scale`` (shoal's ``Hop``); every hop's layer must be stored."""
        hops = [_as_hop(h) for h in path]
        if not hops:
            raise LayerPathError("a layer path needs at least one hop")
        missing = [[m, layer] for m, layer, _ in hops if (m, layer) not in self.table]
        if missing:
            raise LayerPathError(f"path uses layers that are not stored in this model: {missing[:5]}")
        self.hops = tuple((self.table[(m, layer)], scale) for m, layer, scale in hops)
        self.config.path = [[m, layer, scale] for m, layer, scale in hops]
        self.config.num_hidden_layers = len(hops)

    @property
    def path(self) -> list[list[Any]]:
        """The hops, ``[[model, layer, scale], ...]``."""
        return [list(h) for h in self.config.path]

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def _sync_attention(self) -> None:
        # The stored layers read the attention kernel from their own source configs; the mask is
        # built for the top-level config's kernel, so both must agree.
        wanted = self.config._attn_implementation
        for cfg in self.source_configs:
            if cfg._attn_implementation != wanted:
                cfg._attn_implementation = wanted

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                cache: Cache | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        past_key_values = cache if cache is not None else past_key_values  # the name of transformers >= 5.24
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        if use_cache and past_key_values is None:
            past_key_values = _new_cache(self.config)
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen)[None]
        if "cache_position" not in kwargs and _declared(create_causal_mask, ("cache_position",)):
            # transformers 4.x masks and caches by absolute positions; 5.x dropped the argument
            kwargs["cache_position"] = torch.arange(seen, seen + inputs_embeds.shape[1], device=inputs_embeds.device)
        self._sync_attention()
        masking = {embeds_keyword(create_causal_mask): inputs_embeds, cache_keyword(create_causal_mask): past_key_values}
        if "cache_position" in kwargs and _declared(create_causal_mask, ("cache_position",)):
            masking["cache_position"] = kwargs["cache_position"]
        mask = create_causal_mask(config=self.config, attention_mask=attention_mask, position_ids=position_ids,
                                  **masking)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for hop, (block, scale) in enumerate(self.hops):
            if scale != 1.0:
                hidden = hidden * scale
            layer = self.blocks[block]
            hop_cache = _HopCache(past_key_values, hop) if past_key_values is not None else None
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=use_cache,
                           position_embeddings=position_embeddings,
                           **{cache_keyword(type(layer).forward): hop_cache}, **kwargs)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden,
                                       **{cache_field(): past_key_values if use_cache else None})


class LayerPathForCausalLM(LayerPathPreTrainedModel, GenerationMixin):
    """A causal LM over a layer path."""

    # save_pretrained copies this file (and the config's) into the folder and writes auto_map
    _auto_class = "AutoModelForCausalLM"

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LayerPathConfig):
        super().__init__(config)
        self.model = LayerPathModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def path(self) -> list[list[Any]]:
        """The hops, ``[[model, layer, scale], ...]``."""
        return self.model.path

    def set_path(self, path: Iterable[Any]) -> None:
        """Switch to another path over the stored layers (no weights are copied)."""
        self.model.set_path(path)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                cache: Cache | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        kwargs.pop("return_dict", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache if cache is not None else past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (B, T', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{cache_field(): getattr(outputs, cache_field())})
