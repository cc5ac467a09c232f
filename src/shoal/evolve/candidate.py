"""Candidates in memory: merge a recipe straight into a resident model, never touching disk.

The sources' tensors are read once and kept; each candidate is planned (headers only), its
tensors computed with the same :func:`shoal.merge.compute_op` that ``shoal merge`` uses, and
copied into the parameters of one resident model. The result is bitwise the model that
``shoal merge`` of the same recipe would write and ``transformers`` would load.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping

import torch

from shoal.checkpoint import CheckpointReader, open_checkpoint
from shoal.errors import MergeError
from shoal.merge.execute import compute_op
from shoal.merge.plan import SourceRef, plan_merge
from shoal.merge.recipe import Recipe


class CandidateBuilder:
    """Holds the source tensors of a set of models and merges recipes over them in memory."""

    def __init__(self, models: list[str], *, device: str = "cpu", allow_pickle: bool = False):
        self._stack = ExitStack()
        self.device = device
        self.readers: dict[str, CheckpointReader] = {
            name: self._stack.enter_context(open_checkpoint(name, allow_pickle=allow_pickle))
            for name in dict.fromkeys(models)
        }
        self._cache: dict[SourceRef, torch.Tensor] = {}

    def close(self) -> None:
        self._cache.clear()
        self._stack.close()

    def __enter__(self) -> "CandidateBuilder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fetch(self, ref: SourceRef) -> torch.Tensor:
        tensor = self._cache.get(ref)
        if tensor is None:
            tensor = self.readers[ref.model].get(ref.tensor, device=self.device)
            self._cache[ref] = tensor
        return tensor

    def state_dict(self, recipe: Recipe, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """The merged tensors of ``recipe`` by output name."""
        plan = plan_merge(recipe, self.readers, seed=seed)
        return {op.name: compute_op(op, self._fetch, compat=recipe.compat, device=self.device)
                for op in plan.ops}

    def load_model(self, reference: str, *, dtype: torch.dtype = torch.float32) -> Any:
        """A transformers model with the architecture and config of ``reference``."""
        from shoal.eval.loading import load_network

        path = self.readers[reference].path
        folder = path if Path(path).is_dir() else Path(path).parent
        return load_network(folder, device=self.device, dtype=dtype)

    def apply(self, model: Any, recipe: Recipe, *, seed: int = 0) -> None:
        """Write the candidate's weights into ``model`` in place."""
        write_state(model, self.state_dict(recipe, seed=seed))


def checkpoint_names(model: Any) -> dict[str, torch.Tensor]:
    """A model's parameters and buffers by the names a checkpoint file gives them.

    transformers 5 loads some models under other names than their files use (a LLaVA file's
    ``language_model.model.layers.0...`` is the module ``model.language_model.layers.0...``);
    the merged tensors carry the file's names, so both spellings find their parameter.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 loads files under their own names
        return params
    saved = revert_weight_conversion(model, dict(params))
    by_id = {id(t): t for t in params.values()}
    for name, tensor in saved.items():
        if id(tensor) in by_id:  # renamed, not converted (a converted tensor is a new object)
            params.setdefault(name, tensor)
    return params


def write_state(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into a model's parameters and buffers by name (in memory or as saved); every
    parameter must be covered (tied weights count as covered through the tensor they are tied to)."""
    params = checkpoint_names(model)
    covered: set[int] = set()
    with torch.no_grad():
        for name, tensor in state.items():
            target = params.get(name)
            if target is None:
                raise MergeError(f"merged tensor {name!r} has no place in the model")
            if tuple(target.shape) != tuple(tensor.shape):
                raise MergeError(f"merged tensor {name!r} has shape {list(tensor.shape)}, the model "
                                 f"expects {list(target.shape)}")
            target.copy_(tensor)
            covered.add(id(target))
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in covered]
    if missing:
        raise MergeError(f"the merge leaves model parameters unset: {missing[:3]}")
