"""Layer paths: the route a token takes through the decoder layers of several models.

A path is a sequence of hops ``(model, layer, scale)``. Hop ``k`` runs layer ``layer`` of source
model ``model`` on the hidden state scaled by ``scale``::

    h_0 = embed(tokens)                      # the first model's embeddings
    h_k = layer_k(scale_k * h_{k-1})         # k = 1 .. len(path)
    logits = lm_head(norm(h_K))              # the first model's final norm and head

This is the data-flow-space (DFS) model of Akiba et al., "Evolutionary Optimization of Model
Merging Recipes" (arXiv 2403.13187, section 3.2), where the scale of a hop is the factor on the
input travelling from the previous layer into this one. Decoder layers are residual blocks, so
scaling the input scales the residual stream they add to. A path whose scales are all 1 is
plain layer stacking (a "frankenmerge").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from shoal.errors import ConfigError


@dataclass(frozen=True)
class Hop:
    """One step of a path: layer ``layer`` of source model ``model``, input scaled by ``scale``."""

    model: int
    layer: int
    scale: float = 1.0

    @property
    def key(self) -> tuple[int, int]:
        """The stored layer this hop runs."""
        return (self.model, self.layer)


@dataclass(frozen=True)
class LayerPath:
    """An ordered tuple of hops."""

    hops: tuple[Hop, ...]

    def __len__(self) -> int:
        return len(self.hops)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.hops)

    def __getitem__(self, index: int) -> Hop:
        return self.hops[index]

    @property
    def all_ones(self) -> bool:
        """Whether every scale is exactly 1 (the path is plain layer stacking)."""
        return all(h.scale == 1.0 for h in self.hops)

    def distinct_layers(self) -> tuple[tuple[int, int], ...]:
        """Each ``(model, layer)`` the path runs, once, in order of first use."""
        return tuple(dict.fromkeys(h.key for h in self.hops))

    def models_used(self) -> tuple[int, ...]:
        return tuple(sorted({h.model for h in self.hops}))

    def to_list(self) -> list[list[Any]]:
        """JSON form: ``[[model, layer, scale], ...]`` (as stored in config.json)."""
        return [[h.model, h.layer, float(h.scale)] for h in self.hops]

    def describe(self, names: Sequence[str] | None = None) -> str:
        """One line per hop, e.g. ``3  model 1 (math) layer 7  x0.85``."""
        lines = []
        for i, hop in enumerate(self.hops):
            label = f"model {hop.model}" + (f" ({names[hop.model]})" if names else "")
            lines.append(f"{i:>3}  {label} layer {hop.layer}  x{hop.scale:.4g}")
        return "\n".join(lines)


def make_path(hops: Iterable[Hop | Sequence[Any]]) -> LayerPath:
    """A path from hops or ``(model, layer[, scale])`` sequences (as in config.json)."""
    result = []
    for i, hop in enumerate(hops):
        if isinstance(hop, Hop):
            result.append(hop)
            continue
        items = list(hop)
        if len(items) not in (2, 3):
            raise ConfigError(f"path[{i}]: a hop is [model, layer] or [model, layer, scale], got {items}")
        model, layer = items[0], items[1]
        scale = items[2] if len(items) == 3 else 1.0
        if isinstance(model, bool) or isinstance(layer, bool) or int(model) != model or int(layer) != layer:
            raise ConfigError(f"path[{i}]: model and layer must be integers, got {items}")
        result.append(Hop(int(model), int(layer), float(scale)))
    return LayerPath(tuple(result))


def identity_path(num_layers: int, model: int = 0) -> LayerPath:
    """Every layer of one model, in order, scale 1: the model itself."""
    return LayerPath(tuple(Hop(model, layer) for layer in range(num_layers)))


def check_path(path: LayerPath, layer_counts: Sequence[int], *, names: Sequence[str] | None = None) -> None:
    """Raise :class:`ConfigError` unless every hop names an existing layer of a source model
    and has a finite scale; the path must not be empty."""
    if len(path) == 0:
        raise ConfigError("a layer path needs at least one hop")
    for i, hop in enumerate(path):
        if not 0 <= hop.model < len(layer_counts):
            raise ConfigError(f"path[{i}]: model {hop.model} does not exist (there are "
                              f"{len(layer_counts)} source models)")
        count = layer_counts[hop.model]
        if not 0 <= hop.layer < count:
            who = names[hop.model] if names else f"model {hop.model}"
            raise ConfigError(f"path[{i}]: layer {hop.layer} does not exist in {who} ({count} layers)")
        if not (hop.scale == hop.scale and abs(hop.scale) != float("inf")):
            raise ConfigError(f"path[{i}]: scale must be a finite number, got {hop.scale}")
