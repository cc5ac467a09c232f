"""The seed of task splits for a command that scores one model."""

from __future__ import annotations


def task_seed_for(model: str, given: int | None) -> int:
    """``given`` when the user chose a seed, else the seed of the zoo world ``model`` comes from
    (``zoo:small@1/math`` or that world's folder: 1), else 0 -- so that a world's model is scored
    on its own world's held-out splits."""
    if given is not None:
        return given
    from shoal.eval.loading import locate_model
    from shoal.eval.registry import task_seed_of_models

    location = locate_model(model)
    if location.path is None:
        return 0
    seed = task_seed_of_models([location.path])
    return 0 if seed is None else seed
