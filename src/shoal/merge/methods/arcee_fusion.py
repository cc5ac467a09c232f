"""Arcee Fusion: take the other model's value only where it changed the base unusually much."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, check_compat, check_tensors, working_dtype
from shoal.merge.registry import merge_method

MERGEKIT_DOCS = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
SOFTMAX_FLOOR = 1e-8  # added to both softmaxes before the KL divergence's logarithm
IQR_FACTOR = 1.5  # threshold = median + 1.5 * (q3 - q1): Tukey's upper fence, from the median


@merge_method("arcee_fusion", needs_base=True, paper=MERGEKIT_DOCS, min_models=1, max_models=1)
def arcee_fusion(base: torch.Tensor, models: Sequence[torch.Tensor], *, compat: Compat = "paper") -> torch.Tensor:
    """Arcee Fusion: keep the other model's entries whose importance is an outlier, the base's elsewhere.

    Arcee AI, mergekit's docs/merge_methods.md "Arcee Fusion", https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md
    importance = |m - base| * KL(softmax(m) + 1e-8 || softmax(base) + 1e-8), the softmaxes and the
    KL sum along the last dim (one KL per row); q1, median, q3: the entries at ranks
    floor(q (n - 1)) of the sorted importances; result = m where importance >= median + 1.5 (q3 - q1),
    base elsewhere. ``compat="mergekit"``: the importance in the inputs' own dtype, as mergekit
    computes it (in bf16 the KL of near-equal rows is mostly rounding, so the masks differ), and
    kept entries as base + (m - base). Both modes compute the quartiles exactly; mergekit
    estimates those of a tensor over 10^6 entries from a random sample.
    """
    out_dtype = check_tensors("arcee_fusion", base, models, needs_base=True, min_models=1, max_models=1)
    check_compat("arcee_fusion", compat)
    dtype = out_dtype if compat == "mergekit" else working_dtype(out_dtype)
    origin, other = base.to(dtype), models[0].to(dtype)
    p = torch.softmax(other, dim=-1) + SOFTMAX_FLOOR
    q = torch.softmax(origin, dim=-1) + SOFTMAX_FLOOR
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1): one per row
    importance = (other - origin).abs() * divergence
    q1, median, q3 = _ranked(importance.reshape(-1), (0.25, 0.5, 0.75))
    keep = importance >= median + IQR_FACTOR * (q3 - q1)
    if compat == "mergekit":  # its float mask promotes the sum to float32
        return (origin + (other - origin) * keep.to(torch.float32)).to(out_dtype)
    return torch.where(keep, other, origin).to(out_dtype)


def _ranked(values: torch.Tensor, shares: tuple[float, ...]) -> list[torch.Tensor]:
    """The entries at ranks floor(share * (n - 1)) of the sorted ``values`` (0-based), as 0-d tensors."""
    last = values.numel() - 1
    return [torch.kthvalue(values, int(share * last) + 1).values for share in shares]
