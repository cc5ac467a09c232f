"""Per-block parameter-space genes for text-to-image pipelines (EvoSDXL-JP's search, in PS).

The merge is task arithmetic relative to a base pipeline: for every merged tensor ``p``,
``p = base + sum_m w[m, group(p)] * (p_m - base)``. The groups are the UNet's blocks in the
numbering block-merge users know (``IN00 .. M00 .. OUT..``, from
:func:`shoal.checkpoint.unet.unet_block_map`), one group for the UNet tensors in no block (the
time embedding), and for the text encoder its embeddings, each of its layers, and its final
norm. One gene per (specialist, group), in [0, 1], onto ``[low, high]`` through the gene
transform every search space shares (:func:`shoal.flow.genes.to_range`), so the start point
0.5 is the plain task-arithmetic merge with weight ``(low + high) / 2``.

The genes can be coarser than the groups (``genes="parts"``): one gene per specialist for the
UNet's down blocks (``IN..``), its middle block, its up blocks (``OUT..``), the UNet tensors in
no block, and the whole text encoder. The groups stay what the merge and its recipe are
written in; a coarse gene sets the weight of every group it covers.

Decoding a genome gives a mergekit-style recipe (``task_arithmetic``, per-model ``weight``
as a filter list over block names and text-encoder prefixes) that ``shoal merge`` builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from shoal.checkpoint.unet import unet_block_map
from shoal.errors import ConfigError
from shoal.flow.genes import to_range

UNET, TEXT = "unet", "text_encoder"
UNET_REST = "unet_rest"
_TEXT_ROOT = "text_model."  # transformers 4 names CLIP text tensors under it, 5 does not
_TEXT_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def _text_inner(name: str) -> str:
    return name[len(_TEXT_ROOT):] if name.startswith(_TEXT_ROOT) else name


def text_group(name: str) -> str:
    """The group of a CLIP text-encoder tensor: ``te_embed``, ``te_layer<i>`` or ``te_final``."""
    inner = _text_inner(name)
    match = _TEXT_LAYER.match(inner)
    if match:
        return f"te_layer{int(match.group(1))}"
    if inner.startswith("embeddings."):
        return "te_embed"
    return "te_final"


def tensor_groups(unet_names: Iterable[str], text_names: Iterable[str]) -> dict[tuple[str, str], str]:
    """``(component, tensor name) -> group`` for every tensor of the UNet and the text encoder."""
    unet_names = list(unet_names)
    blocks = unet_block_map([f"{UNET}/{n}" for n in unet_names])
    groups = {(UNET, n): blocks.get(f"{UNET}/{n}", UNET_REST) for n in unet_names}
    groups.update({(TEXT, n): text_group(n) for n in text_names})
    return groups


def _group_order(group: str) -> tuple[int, int]:
    if group.startswith("te_"):
        rank = {"te_embed": -1, "te_final": 10**6}.get(group)
        return 4, rank if rank is not None else int(group[len("te_layer"):])
    if group == UNET_REST:
        return 3, 0
    kind = 0 if group.startswith("IN") else 1 if group == "M00" else 2
    return kind, int(group[-2:])


GENE_LEVELS = ("blocks", "parts")
UNET_PARTS = {"IN": "unet_down", "M": "unet_mid", "OUT": "unet_up"}


def gene_group(group: str, genes: str = "blocks") -> str:
    """The gene that sets ``group``'s weight: the group itself (``blocks``), or its part
    (``parts``: ``unet_down`` / ``unet_mid`` / ``unet_up`` / ``unet_rest`` / ``text_encoder``)."""
    if genes == "blocks" or group == UNET_REST:
        return group
    if genes != "parts":
        raise ConfigError(f"unknown gene level {genes!r}; expected one of {list(GENE_LEVELS)}")
    if group.startswith("te_"):
        return TEXT
    for prefix, part in UNET_PARTS.items():
        if group.startswith(prefix) and group[len(prefix):].isdigit():
            return part
    raise ConfigError(f"group {group!r} is in no UNet part")


@dataclass(frozen=True)
class BlockGene:
    key: str  # the genome's name for it: "<model>:<group>"
    model: str
    group: str


@dataclass(frozen=True)
class DiffusionSpace:
    """Genes per (specialist, group) and how they decode to task-arithmetic weights."""

    models: tuple[str, ...]
    groups: tuple[str, ...]
    low: float = 0.0
    high: float = 2.0
    text_root: str = ""  # how the text encoder's tensor names begin ("" or "text_model.")
    level: str = "blocks"  # one gene per group ("blocks") or per UNet part / text encoder ("parts")

    def __post_init__(self) -> None:
        if not self.models or not self.groups:
            raise ConfigError("a diffusion search space needs at least one model and one group")
        if not self.low < self.high:
            raise ConfigError(f"weight range [{self.low}, {self.high}] is empty")
        if self.level not in GENE_LEVELS:
            raise ConfigError(f"unknown gene level {self.level!r}; expected one of {list(GENE_LEVELS)}")

    @property
    def gene_groups(self) -> tuple[str, ...]:
        """The groups that have a gene of their own, in the groups' order."""
        return tuple(dict.fromkeys(gene_group(g, self.level) for g in self.groups))

    @property
    def genes(self) -> tuple[BlockGene, ...]:
        return tuple(BlockGene(f"{m}:{g}", m, g) for m in self.models for g in self.gene_groups)

    @property
    def size(self) -> int:
        return len(self.models) * len(self.gene_groups)

    def weights(self, genome: Sequence[float]) -> dict[tuple[str, str], float]:
        """``(model, group) -> weight`` for every group, from a genome in :attr:`genes` order."""
        if len(genome) != self.size:
            raise ConfigError(f"a genome of {len(genome)} genes for a space of {self.size}")
        per_gene = {(g.model, g.group): to_range(float(x), self.low, self.high)
                    for g, x in zip(self.genes, genome)}
        return {(m, g): per_gene[(m, gene_group(g, self.level))] for m in self.models for g in self.groups}

    def uniform_weights(self, weight: float) -> dict[tuple[str, str], float]:
        """Every model and group at ``weight`` (the uniform merge, and the uniform search's point)."""
        return {(m, g): weight for m in self.models for g in self.groups}


def block_space(unet_names: Iterable[str], text_names: Iterable[str], models: Sequence[str], *,
                low: float = 0.0, high: float = 2.0, genes: str = "blocks") -> DiffusionSpace:
    """The per-block space over a pipeline whose UNet and text encoder have these tensors,
    with one gene per group (``genes="blocks"``) or per UNet part and text encoder (``"parts"``)."""
    text_names = list(text_names)
    groups = sorted(set(tensor_groups(unet_names, text_names).values()), key=_group_order)
    root = _TEXT_ROOT if any(n.startswith(_TEXT_ROOT) for n in text_names) else ""
    return DiffusionSpace(models=tuple(models), groups=tuple(groups), low=low, high=high,
                          text_root=root, level=genes)


def _filters(group: str, text_layers: Mapping[str, str]) -> str:
    return text_layers.get(group, group)


def weights_recipe(space: DiffusionSpace, weights: Mapping[tuple[str, str], float], *,
                   base: str, sources: Mapping[str, str]) -> dict:
    """The merge as a recipe (a plain dict, YAML-ready): task arithmetic relative to ``base``,
    each model's ``weight`` a filter list over UNet block names and text-encoder prefixes.
    UNet tensors in no block take the list's default (its last, unfiltered value)."""
    root = f"{TEXT}/{space.text_root}"
    text_prefix = {g: f"{root}encoder.layers.{g[len('te_layer'):]}."
                   for g in space.groups if g.startswith("te_layer")}
    text_prefix.update({"te_embed": f"{root}embeddings.", "te_final": f"{root}final_layer_norm."})
    models = []
    for model in space.models:
        values = [{"filter": _filters(g, text_prefix), "value": round(weights[(model, g)], 6)}
                  for g in space.groups if g != UNET_REST]
        rest = weights.get((model, UNET_REST))
        values.append({"value": round(rest if rest is not None else 1.0, 6)})
        models.append({"model": sources[model], "parameters": {"weight": values}})
    return {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": base}, *models], "dtype": "float32"}
