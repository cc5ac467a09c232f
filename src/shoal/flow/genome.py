"""The data-flow-space (DFS) genome of arXiv 2403.13187 (section 3.2) and its decoding to a path.

Lay the ``M`` layers of the source models out in order (model 0's layers, then model 1's, ...)
and repeat that sequence ``r`` times: ``T = M * r`` slots; slot ``t`` holds global layer
``t mod M``. Genes, all in [0, 1] as the search loop samples them:

- ``I<t>`` (``T`` genes), the indicator array: slot ``t`` is on the path when ``I_t > 0``, where
  ``I_t = gene - 1/2``. When more slots are on than the path-length limit allows, the ones
  with the largest indicator stay (ties: earlier slot), in slot order.
- scaling, ``scaling="matrix"``: ``W<i>.<j>`` (``M * M`` genes), the paper's scaling matrix: the
  input travelling from global layer ``i`` into global layer ``j`` is scaled by ``W_ij``;
  ``scaling="per_slot"`` (compact): ``S<t>`` (``T`` genes), the scale of the hop that slot ``t``
  becomes. A gene maps onto ``scale_range`` by :func:`shoal.flow.genes.to_range`, the
  transform of every search space (the middle of the default range (0, 2) is 1).

Fixed endpoints: the path starts with model 0's first layer (scale 1, fed by model 0's
embeddings) and ends with model 0's last layer; model 0 also gives the final norm, head and
tokenizer. With the matrix the end hop's scale is ``W[previous, end]``; per slot it is 1.
``max_hops`` limits the whole path, endpoints included.

The initial genome favours model 0: its layers between the endpoints in the first repetition
are on (``1/2 + init_margin``), every other slot off (``1/2 - init_margin``), and every scale
is 1, so the starting path is model 0 itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from shoal.errors import ConfigError
from shoal.flow.genes import from_range, to_range
from shoal.flow.path import Hop, LayerPath

Scaling = Literal["matrix", "per_slot"]


@dataclass(frozen=True)
class DfsLayout:
    """The shape of a DFS search: the sources' layer counts and the genome's settings."""

    layer_counts: tuple[int, ...]
    repeats: int = 3
    max_hops: int | None = None
    scaling: Scaling = "matrix"
    scale_range: tuple[float, float] = (0.0, 2.0)
    init_margin: float = 0.25

    def __post_init__(self) -> None:
        if len(self.layer_counts) < 1 or any(c < 1 for c in self.layer_counts):
            raise ConfigError(f"layer counts must be positive, got {list(self.layer_counts)}")
        if self.layer_counts[0] < 2:
            raise ConfigError("the first model needs >= 2 layers: its first and last layers are the "
                              "fixed ends of the path")
        if self.repeats < 1:
            raise ConfigError(f"repeats (r) must be >= 1, got {self.repeats}")
        if self.max_hops is not None and self.max_hops < 2:
            raise ConfigError(f"max_hops must be >= 2 (the two fixed ends), got {self.max_hops}")
        if self.scaling not in ("matrix", "per_slot"):
            raise ConfigError(f"scaling must be 'matrix' or 'per_slot', got {self.scaling!r}")
        low, high = self.scale_range
        if not low < high:
            raise ConfigError(f"scale_range must satisfy low < high, got {list(self.scale_range)}")
        if not low <= 1.0 <= high:
            raise ConfigError(f"scale_range {list(self.scale_range)} must contain 1 (the initial scale)")
        if not 0.0 < self.init_margin <= 0.5:
            raise ConfigError(f"init_margin must lie in (0, 0.5], got {self.init_margin}")


@dataclass(frozen=True)
class DfsSpace:
    """The genes of a DFS search and how they become a :class:`LayerPath` (and back)."""

    layout: DfsLayout

    # -- layout ------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """``M``: the layers of all sources together."""
        return sum(self.layout.layer_counts)

    @property
    def num_slots(self) -> int:
        """``T = M * r``."""
        return self.num_layers * self.layout.repeats

    def global_index(self, model: int, layer: int) -> int:
        return sum(self.layout.layer_counts[:model]) + layer

    def local(self, index: int) -> tuple[int, int]:
        """``(model, layer)`` of global layer ``index``."""
        for model, count in enumerate(self.layout.layer_counts):
            if index < count:
                return model, index
            index -= count
        raise IndexError(index)

    @property
    def start(self) -> Hop:
        return Hop(0, 0, 1.0)

    @property
    def end_index(self) -> int:
        return self.layout.layer_counts[0] - 1

    @property
    def capacity(self) -> int:
        """How many slots may be on (the path-length limit less the two fixed ends)."""
        limit = self.layout.max_hops
        return self.num_slots if limit is None else min(limit - 2, self.num_slots)

    # -- genes -------------------------------------------------------------------------------

    def indicator_keys(self) -> list[str]:
        return [f"I{t}" for t in range(self.num_slots)]

    def scale_keys(self) -> list[str]:
        if self.layout.scaling == "matrix":
            m = self.num_layers
            return [f"W{i}.{j}" for i in range(m) for j in range(m)]
        return [f"S{t}" for t in range(self.num_slots)]

    @property
    def keys(self) -> list[str]:
        """Every gene name, indicators first."""
        return self.indicator_keys() + self.scale_keys()

    @property
    def size(self) -> int:
        return len(self.keys)

    def default_genome(self) -> dict[str, float]:
        """The starting point: model 0's own layers in the first repetition, every scale 1."""
        margin = self.layout.init_margin
        genome = {f"I{t}": 0.5 - margin for t in range(self.num_slots)}
        for t in range(1, self.end_index):
            genome[f"I{t}"] = 0.5 + margin
        one = from_range(1.0, *self.layout.scale_range)
        genome.update({key: one for key in self.scale_keys()})
        return genome

    def _scale(self, genome: Mapping[str, float], key: str) -> float:
        return to_range(float(genome[key]), *self.layout.scale_range)

    def selected_slots(self, genome: Mapping[str, float]) -> list[int]:
        """The slots on the path, in slot order, after the path-length limit."""
        on = [t for t in range(self.num_slots) if float(genome[f"I{t}"]) - 0.5 > 0.0]
        if len(on) > self.capacity:
            strongest = sorted(on, key=lambda t: (-float(genome[f"I{t}"]), t))[:self.capacity]
            on = sorted(strongest)
        return on

    def decode(self, genome: Mapping[str, float]) -> LayerPath:
        """The path of a genome (see the module docstring)."""
        missing = [k for k in self.keys if k not in genome]
        if missing:
            raise ConfigError(f"genome lacks genes {missing[:5]}{'...' if len(missing) > 5 else ''}")
        hops = [self.start]
        previous = 0
        m = self.num_layers
        for t in self.selected_slots(genome):
            index = t % m
            if self.layout.scaling == "matrix":
                scale = self._scale(genome, f"W{previous}.{index}")
            else:
                scale = self._scale(genome, f"S{t}")
            model, layer = self.local(index)
            hops.append(Hop(model, layer, scale))
            previous = index
        end_scale = self._scale(genome, f"W{previous}.{self.end_index}") if self.layout.scaling == "matrix" else 1.0
        hops.append(Hop(0, self.end_index, end_scale))
        return LayerPath(tuple(hops))

    def encode(self, path: LayerPath) -> dict[str, float]:
        """A genome that decodes to ``path`` (scales up to float rounding).

        Each middle hop takes the earliest free slot of its layer after the previous hop's,
        so a path needs at most ``r`` passes over the layer sequence. Scales of the matrix
        form must agree wherever the path makes the same transition twice.
        """
        hops = list(path)
        if len(hops) < 2 or hops[0].key != self.start.key or hops[-1].key != (0, self.end_index):
            raise ConfigError(f"a DFS path starts with model 0's layer 0 and ends with its layer "
                              f"{self.end_index}; got {[list(h.key) for h in hops[:1] + hops[-1:]]}")
        if hops[0].scale != 1.0:
            raise ConfigError(f"the first hop's scale is fixed at 1, got {hops[0].scale}")
        middle = hops[1:-1]
        if len(middle) > self.capacity:
            raise ConfigError(f"path has {len(hops)} hops, more than the limit of {self.capacity + 2}")
        low, high = self.layout.scale_range
        margin = self.layout.init_margin
        genome = {f"I{t}": 0.5 - margin for t in range(self.num_slots)}
        one = from_range(1.0, low, high)
        genome.update({key: one for key in self.scale_keys()})
        assigned: dict[str, float] = {}
        m = self.num_layers
        slot, previous = 0, 0
        for i, hop in enumerate(middle + [hops[-1]], start=1):
            if not (0 <= hop.model < len(self.layout.layer_counts)
                    and 0 <= hop.layer < self.layout.layer_counts[hop.model]):
                raise ConfigError(f"path[{i}]: layer {list(hop.key)} is not in the layout")
            if not low <= hop.scale <= high:
                raise ConfigError(f"path[{i}]: scale {hop.scale} lies outside scale_range {[low, high]}")
            index = self.global_index(hop.model, hop.layer)
            is_end = i == len(middle) + 1
            if not is_end:
                t = slot + (index - slot) % m
                if t >= self.num_slots:
                    raise ConfigError(f"path[{i}]: needs more than r={self.layout.repeats} passes over the layers")
                genome[f"I{t}"] = 0.5 + margin
                slot = t + 1
            if self.layout.scaling == "matrix":
                key = f"W{previous}.{index}"
                if key in assigned and assigned[key] != hop.scale:
                    raise ConfigError(f"path[{i}]: transition {previous}->{index} has scales "
                                      f"{assigned[key]} and {hop.scale}; the matrix holds one")
                assigned[key] = hop.scale
            elif is_end:
                if hop.scale != 1.0:
                    raise ConfigError(f"path[{i}]: with per-slot scaling the last hop's scale is 1, "
                                      f"got {hop.scale}")
            else:
                assigned[f"S{t}"] = hop.scale
            previous = index
        genome.update({key: from_range(value, low, high) for key, value in assigned.items()})
        return genome

    def describe(self, path: LayerPath, names: Sequence[str] | None = None) -> str:
        """The path as text, one hop per line (for reports)."""
        return path.describe(names)
