"""Which block of a Stable Diffusion UNet a tensor belongs to, in the numbering block-merge users know.

Block-weighted merging (merge-block-weighted, sd-webui-supermerger, sd-mecha) gives one weight to
each of the UNet's input blocks ``IN00..``, its middle block ``M00`` and its output blocks
``OUT00..``: SD 1.x/2.x has ``IN00..IN11, M00, OUT00..OUT11``, SDXL ``IN00..IN08, M00, OUT00..OUT08``.
The numbers are those of the original (LDM) checkpoint's ``input_blocks.N`` / ``output_blocks.N``;
diffusers names map to them through the layout (``layers_per_block`` resnets per down block, one more
per up block), which is read from the tensor names themselves:

==============================================  ==========================================
original (``model.diffusion_model.`` + ...)     diffusers (``unet/`` + ...)
==============================================  ==========================================
``input_blocks.0``                              ``conv_in``                        -> IN00
``input_blocks.N`` (N = 1 + b(L+1) + j)         ``down_blocks.b.{resnets,attentions}.j``
``input_blocks.N`` (N = (b+1)(L+1))             ``down_blocks.b.downsamplers``
``middle_block``                                ``mid_block``                      -> M00
``output_blocks.N`` (N = b(L+1) + j)            ``up_blocks.b.{resnets,attentions}.j``
``output_blocks.N`` (N = b(L+1) + L)            ``up_blocks.b.upsamplers``
``out.``                                        ``conv_norm_out``, ``conv_out``    -> last OUT
``time_embed``, ``label_emb``                   ``time_embedding``, ``add_embedding``, ... -> no block
==============================================  ==========================================

The final norm and convolution belong to the last output block, as in merge-block-weighted and
supermerger; the time and label embeddings belong to no block (a recipe's default applies to them).
Names may carry the component prefix ``unet/`` or the single-file prefix ``model.diffusion_model.``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

UNET_PREFIXES = ("unet/", "model.diffusion_model.")
#: a block name as recipes write it in a filter: ``IN04``, ``M00``, ``OUT11``
BLOCK_NAME = re.compile(r"^(?:IN\d\d|M00|OUT\d\d)$")

_ORIGINAL = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")
_DIFFUSERS = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_ORIGINAL_MARKS = ("input_blocks.", "middle_block.", "output_blocks.")
_DIFFUSERS_MARKS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.")
_ORIGINAL_LAST = ("out.",)
_DIFFUSERS_LAST = ("conv_norm_out.", "conv_out.")


def _inner(name: str) -> str:
    for prefix in UNET_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _is_unet_name(name: str) -> bool:
    """A name of the UNet: prefixed ``unet/`` / ``model.diffusion_model.``, or a bare UNet name
    (as in a UNet folder opened by itself); never another component's (``vae/``, ``text_encoder/``)."""
    if name.startswith(UNET_PREFIXES):
        return True
    return "/" not in name and name.startswith(_ORIGINAL_MARKS + _DIFFUSERS_MARKS + _DIFFUSERS_LAST)


def _layout(inners: list[str]) -> tuple[int, int, int]:
    """(input blocks, output blocks, resnets per down block) of the UNet these (unprefixed) names describe."""
    max_in = max_out = -1
    down = resnets = 0
    for inner in inners:
        match = _ORIGINAL.match(inner)
        if match:
            index = int(match.group(2))
            if match.group(1) == "input_blocks":
                max_in = max(max_in, index)
            else:
                max_out = max(max_out, index)
            continue
        match = _DIFFUSERS.match(inner)
        if match and match.group(1) == "down_blocks":
            down = max(down, int(match.group(2)) + 1)
            if match.group(3) == "resnets":
                resnets = max(resnets, int(match.group(4)) + 1)
    if max_in >= 0 or max_out >= 0:
        return max_in + 1, max_out + 1, 0
    return down * (resnets + 1), down * (resnets + 1), resnets


def _block(inner: str, outputs: int, resnets: int) -> str | None:
    if inner.startswith("middle_block.") or inner.startswith("mid_block."):
        return "M00"
    if inner.startswith(_ORIGINAL_LAST + _DIFFUSERS_LAST):
        return f"OUT{outputs - 1:02d}" if outputs else None
    if inner.startswith("conv_in."):
        return "IN00"
    match = _ORIGINAL.match(inner)
    if match:
        return ("IN" if match.group(1) == "input_blocks" else "OUT") + f"{int(match.group(2)):02d}"
    match = _DIFFUSERS.match(inner)
    if match:
        kind, block, sub, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        span = resnets + 1
        if kind == "down_blocks":
            return f"IN{(block + 1) * span if sub == 'downsamplers' else 1 + block * span + j:02d}"
        return f"OUT{block * span + (resnets if sub == 'upsamplers' else j):02d}"
    return None


def unet_block_map(tensor_names: Iterable[str]) -> dict[str, str]:
    """Every UNet tensor among ``tensor_names`` that lies in a block -> its block (``IN04``, ``M00``, ``OUT11``).

    Names of other components, and UNet tensors in no block (the time embedding), are left out.
    """
    names = [n for n in tensor_names if _is_unet_name(n)]
    inners = [_inner(n) for n in names]
    _, outputs, resnets = _layout(inners)
    found = {}
    for name, inner in zip(names, inners):
        block = _block(inner, outputs, resnets)
        if block is not None:
            found[name] = block
    return found


def _order(block: str) -> tuple[int, int]:
    kind = 0 if block.startswith("IN") else 1 if block == "M00" else 2
    return kind, int(block[-2:])


def unet_blocks(tensor_names: Iterable[str]) -> list[str]:
    """The blocks of the UNet among ``tensor_names``, in order: ``IN00, IN01, .., M00, OUT00, ..``
    (one gene per block for a search space; empty when there is no UNet)."""
    return sorted(set(unet_block_map(tensor_names).values()), key=_order)


def unet_block_of(name: str, tensor_names: Iterable[str]) -> str | None:
    """The block of tensor ``name``, given all the model's tensor names (they fix the layout); None
    when it is not a UNet tensor or lies in no block. For many names, use :func:`unet_block_map`."""
    return unet_block_map(list(tensor_names) + [name]).get(name)


def is_block_name(text: str) -> bool:
    """Whether ``text`` is written as a block (``IN04``, ``M00``, ``OUT11``)."""
    return bool(BLOCK_NAME.match(text))
