"""Resolve recipe parameter values for one tensor: gradients and filters, as mergekit resolves them.

- A scalar applies to every tensor.
- A gradient (a list of numbers) is interpolated linearly over the layers of a slice (of the
  whole model in a ``models`` recipe): the first anchor at its first layer, the last at its
  last layer. A one-layer slice takes the last anchor, and tensors outside the decoder stack
  (embeddings, final norm, ``lm_head``) take the first: mergekit plans a one-layer slice at
  t = 1 and the tensors outside the layers at t = 0, and shoal follows it in both modes.
- A filter list applies the first entry whose ``filter`` is a substring of the tensor name
  (plain text, not a glob); ``filter: "*"`` and an entry without ``filter`` apply to any
  tensor. No matching entry means "not set here".
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.merge.recipe import FilterValue, ParamValue

MATCH_ALL = "*"  # mergekit's one special filter


@dataclass(frozen=True)
class TensorPosition:
    """Where a tensor sits, for gradients: layer ``layer`` of a slice of ``num_layers``, or outside the layers."""

    name: str
    layer: int | None
    num_layers: int
    block: str | None = None  # the UNet block (``IN04``) of a diffusion model's tensor

    @property
    def fraction(self) -> float:
        """0.0 at a slice's first layer and outside the layers, 1.0 at its last (and in a one-layer slice)."""
        if self.layer is None:
            return 0.0
        if self.num_layers <= 1:
            return 1.0
        return self.layer / (self.num_layers - 1)


_UNSET = object()


def interpolate_gradient(anchors: list[float], fraction: float) -> float:
    """Linear interpolation of evenly spaced ``anchors`` at ``fraction`` in [0, 1]."""
    if len(anchors) == 1:
        return float(anchors[0])
    position = fraction * (len(anchors) - 1)
    low = min(int(position), len(anchors) - 2)
    weight = position - low
    return float(anchors[low] * (1.0 - weight) + anchors[low + 1] * weight)


def resolve_value(value: ParamValue, position: TensorPosition) -> float | bool | object:
    """The value of one parameter for the tensor at ``position``; ``_UNSET`` when no filter matches."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if value and isinstance(value[0], FilterValue):
        for entry in value:  # type: ignore[union-attr]
            if (entry.filter is None or entry.filter == MATCH_ALL or entry.filter in position.name
                    or entry.filter == position.block):
                return resolve_value(entry.value, position)
        return _UNSET
    return interpolate_gradient([float(v) for v in value], position.fraction)  # type: ignore[union-attr]


def is_unset(value: object) -> bool:
    return value is _UNSET


def resolve_first(values: list[ParamValue | None], position: TensorPosition) -> float | bool | object:
    """The first value in ``values`` (most specific first) that is set for this tensor."""
    for value in values:
        if value is None:
            continue
        resolved = resolve_value(value, position)
        if resolved is not _UNSET:
            return resolved
    return _UNSET
