"""The transformers config of a layer-path model (``model_type: shoal_layer_path``).

config.json names everything the runtime needs:

- ``sources``: the source models' names (for reports; weights are stored in the folder);
- ``source_configs``: each source's own config (its decoder layers are built from it; the
  first source's also gives the embeddings, final norm, head and rotary embedding);
- ``layers``: the stored layer table, ``[[model, layer], ...]``; entry ``k`` is stored under
  ``model.blocks.k.*`` (each distinct layer once, however often the path runs it);
- ``path``: the hops, ``[[model, layer, scale], ...]`` (see :mod:`shoal.flow.path`).

The attributes transformers' generation, masking and cache code read from a decoder config
(vocabulary and hidden size, heads, token ids, ...) mirror the first source's, and
``num_hidden_layers`` is the number of hops (one KV-cache slot per hop).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

MODEL_TYPE = "shoal_layer_path"

# First-source attributes that transformers reads from the top-level config.
MIRRORED = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "max_position_embeddings", "rms_norm_eps", "initializer_range", "pad_token_id",
            "bos_token_id", "eos_token_id", "tie_word_embeddings", "hidden_act")


class LayerPathConfig(PretrainedConfig):
    """Config of :class:`~shoal.flow.modeling.LayerPathForCausalLM`."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    sources: list[str] | None = None
    source_configs: list[dict] | None = None
    layers: list[list[int]] | None = None
    path: list[list[Any]] | None = None
    num_hidden_layers: int = 0
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rms_norm_eps: float | None = None
    initializer_range: float = 0.02
    hidden_act: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        first = (self.source_configs or [None])[0]
        if first:
            for key in MIRRORED:
                if getattr(self, key, None) is None and first.get(key) is not None:
                    setattr(self, key, first[key])
            if self.head_dim is None and self.hidden_size and self.num_attention_heads:
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            if not self.tie_word_embeddings and first.get("tie_word_embeddings"):
                self.tie_word_embeddings = True
        if self.path is not None:
            self.num_hidden_layers = len(self.path)
        super().__post_init__(**kwargs)
