"""Which definition a recipe runs in — ``compat: paper`` (the default) or ``compat: mergekit`` — said out loud.

Methods whose paper and mergekit's code differ take ``compat``. A recipe that leaves it out
runs the paper's definition; because a mergekit recipe then gives other weights than
mergekit would, planning warns once, and the dry-run plan and the model card state the mode
and what differs (:func:`mode_lines`).
"""

from __future__ import annotations

from shoal.merge.recipe import Recipe
from shoal.merge.registry import MethodSpec

_SIGNS = "signs elected on the unweighted task vectors (mergekit: weighted, + on a tie)"
_ROUND = "round(density·n) entries kept (mergekit: int(density·n))"
_NORMALIZE = "normalize defaults to true, the disjoint mean (mergekit: false)"
_RESCALE = "kept entries rescaled by 1/p (mergekit: to the task vector's L1 norm)"
_DRAWS = "drop masks drawn by entry position (mergekit: in order from one generator)"
_EPSILON = "epsilon defaults to 0.1 (mergekit: 0.15)"

# what the paper mode does differently from mergekit's, per method with a ``compat`` switch
DIFFERENCES: dict[str, tuple[str, ...]] = {
    "ties": (_SIGNS, _ROUND),
    "dare_ties": (_NORMALIZE, _RESCALE, _DRAWS, _SIGNS),
    "dare_linear": (_RESCALE, _DRAWS),
    "della": (_EPSILON, _RESCALE, _DRAWS, _SIGNS),
    "della_linear": (_EPSILON, _RESCALE, _DRAWS),
    "breadcrumbs": (_ROUND,),
    "breadcrumbs_ties": (_NORMALIZE, _ROUND, _SIGNS),
    "model_stock": ("zero task vectors give ratio 0 (mergekit floors the norm product at 1e-6)",),
    "arcee_fusion": ("the importance computed in float32 (mergekit: in the tensors' dtype)",),
    "sce": ("the variances ranked, and every step computed, in float32 (mergekit: in the tensors' dtype, "
            "e.g. bf16, where the top-variance pick differs on 1-2% of entries)",),
}


def differences(method: MethodSpec) -> tuple[str, ...]:
    if not method.has_compat:
        return ()
    return DIFFERENCES.get(method.name, ("see docs/merge-methods.md",))


def mode_lines(recipe: Recipe, method: MethodSpec) -> list[str]:
    """What the dry-run plan and the model card say about the mode (one line each)."""
    if not method.has_compat:
        return [f"mode: {recipe.compat} (`{method.name}` has one definition: paper and mergekit agree)"]
    given = "set in the recipe" if recipe.compat_given else "the default; `compat` not given"
    lines = [f"mode: {recipe.compat} ({given})"]
    if recipe.compat == "paper":
        lines.append(f"differs from mergekit's `{method.name}`: " + "; ".join(differences(method)))
    else:
        lines.append(f"follows mergekit's `{method.name}` (the paper mode would differ: "
                     + "; ".join(differences(method)) + ")")
    return lines


def mode_warning(recipe: Recipe, method: MethodSpec) -> str | None:
    """One line when the recipe runs a method whose two definitions differ without choosing one."""
    if not method.has_compat or recipe.compat_given:
        return None
    return (f"`{method.name}` runs as its paper defines it (compat: paper, the default), not as mergekit "
            f"does: {'; '.join(differences(method))}; add `compat: mergekit` for mergekit's results")
