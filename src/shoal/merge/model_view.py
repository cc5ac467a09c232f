"""A source model seen in the output's tensor namespace: names after its prefix map, tied heads."""

from __future__ import annotations

from typing import Any, Mapping

from shoal.checkpoint import CheckpointReader, describe_tensor, is_tied, map_prefix


class ModelView:
    """A source model seen in the output's tensor namespace (after its prefix map)."""

    def __init__(self, key: str, reader: CheckpointReader, prefix_map: Mapping[str, str]):
        self.key = key
        self.reader = reader
        self.prefix_map = dict(prefix_map)
        self.to_source: dict[str, str] = {}
        for name in reader.tensor_names():
            mapped = map_prefix(name, self.prefix_map) if self.prefix_map else name
            if mapped is not None:
                self.to_source[mapped] = name
        config = reader.config or {}
        self.tied = is_tied(config, reader.tensor_names()) if config else False
        self.architecture = architecture(config)

    def covers(self, out_name: str) -> bool:
        """Whether this model is expected to provide ``out_name`` (its prefix map reaches it)."""
        if not self.prefix_map:
            return True
        return any(out_name.startswith(target) for target in self.prefix_map.values())

    def source_name(self, out_name: str) -> str | None:
        if out_name in self.to_source:
            return self.to_source[out_name]
        if self.tied and describe_tensor(out_name, self.architecture).role == "lm_head":
            for name in self.to_source:
                info = describe_tensor(name, self.architecture)
                if info.role == "embed" and ("embed_tokens" in name or "wte" in name):
                    return self.to_source[name]
        return None


def architecture(config: Mapping[str, Any]) -> str | None:
    archs = config.get("architectures") or []
    return archs[0] if archs else config.get("model_type")


def count_layers(view: ModelView) -> int:
    layers = [describe_tensor(n, view.architecture).layer for n in view.to_source]
    present = [layer for layer in layers if layer is not None]
    return max(present) + 1 if present else 0
