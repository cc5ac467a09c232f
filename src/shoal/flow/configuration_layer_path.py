"""The transformers config of a layer-path model (``model_type: shoal_layer_path``).

This file is written into every saved layer-path folder (with ``modeling_layer_path.py``), so
that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads the folder
where shoal is not installed. It must therefore import nothing but transformers (and torch).

config.json names everything the runtime needs:

- ``sources``: the source models' names (for reports; weights are stored in the folder);
- ``source_configs``: each source's own config (its decoder layers are built from it; the
  first source's also gives the embeddings, final norm, head and rotary embedding);
- ``layers``: the stored layer table, ``[[model, layer], ...]``; entry ``k`` is stored under
  ``model.blocks.k.*`` (each distinct layer once, however often the path runs it);
- ``path``: the hops, ``[[model, layer, scale], ...]``: hop ``k`` runs layer ``layer`` of source
  ``model`` on the hidden state multiplied by ``scale``.

The attributes transformers' generation, masking and cache code read from a decoder config
(vocabulary and hidden size, heads, token ids, ...) mirror the first source's, and
``num_hidden_layers`` is the number of hops (one KV-cache slot per hop).
"""

from __future__ import annotations

from typing import Any

# the 4.x spelling, which 5.x keeps as an alias of PreTrainedConfig
from transformers import PretrainedConfig

MODEL_TYPE = "shoal_layer_path"

# First-source attributes that transformers reads from the top-level config.
MIRRORED = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "max_position_embeddings", "rms_norm_eps", "initializer_range", "pad_token_id",
            "bos_token_id", "eos_token_id", "hidden_act")


class LayerPathConfig(PretrainedConfig):
    """Config of ``LayerPathForCausalLM``."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # save_pretrained copies this file into the folder and names it in config.json's auto_map
    _auto_class = "AutoConfig"

    # A plain __init__ (not dataclass fields) is what every transformers release accepts from
    # remote code: 4.x calls it directly, 5.x keeps a subclass's own __init__.
    def __init__(self, sources: list[str] | None = None, source_configs: list[dict] | None = None,
                 layers: list[list[int]] | None = None, path: list[list[Any]] | None = None,
                 **kwargs: Any) -> None:
        self.sources = sources
        self.source_configs = source_configs
        self.layers = layers
        self.path = path
        first = (source_configs or [None])[0] or {}
        for key in MIRRORED:
            if kwargs.get(key) is None and first.get(key) is not None:
                kwargs[key] = first[key]
        kwargs.setdefault("initializer_range", 0.02)
        if kwargs.get("head_dim") is None and kwargs.get("hidden_size") and kwargs.get("num_attention_heads"):
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads")
        kwargs["tie_word_embeddings"] = bool(kwargs.get("tie_word_embeddings") or first.get("tie_word_embeddings"))
        kwargs["num_hidden_layers"] = len(path) if path is not None else kwargs.get("num_hidden_layers", 0)
        use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
        # transformers 5.x treats use_cache as a generation setting and drops it from config kwargs
        self.use_cache = use_cache
