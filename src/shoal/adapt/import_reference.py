"""Import an SVF expert saved by Sakana's reference code (SakanaAI/self-adaptive-llms).

The reference saves an expert with ``torch.save`` in one of two layouts:

- ``learnable_params.pt`` (``save_legacy_params``; the released ``ckpts/learnable_params/*.pt``
  read by ``policy/weighted_combination.py``): a dict from the Hugging Face weight name
  (``model.layers.0.mlp.gate_proj.weight``) to a 1-D tensor;
- ``policy_params.pt``: ``Policy.state_dict()``, keys ``learnable_params_module_list.<i>``,
  where i indexes the model's ``state_dict()`` names that contain ``"mlp"`` in order
  (``policy/base.py``).

Either way a vector holds the logits p of one matrix, min(m, n) values, usually bfloat16;
the reference applies z = sigmoid(p) (computed in p's dtype, ``Policy.get_mask``) with the
rescale of the ``reference`` parametrization (:mod:`shoal.adapt.svf`). The importer checks
that the file's matrices are exactly the model's MLP matrices (the reference adapts every
weight whose name contains ``"mlp"``) with one value per singular value, optionally that the
model has an expected fingerprint, and writes a shoal expert (``parametrization="reference"``,
z = sigmoid(p) in float32) recording the model's fingerprint. Shoal and the reference use the
same (Hugging Face) weight names, so names map one to one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.adapt.expert import ExpertError, make_meta, save_expert
from shoal.adapt.svd_cache import load_or_compute_svd
from shoal.progress import ProgressFn, no_progress

POLICY_KEY = re.compile(r"^learnable_params_module_list\.(\d+)$")


def reference_matrix_names(model: nn.Module) -> list[str]:
    """The weights the reference adapts: ``state_dict()`` names containing ``"mlp"``, in order
    (matrices only: the reference runs on Llama and Mistral, whose MLPs have no biases)."""
    return [name for name, tensor in model.state_dict().items() if "mlp" in name and tensor.ndim == 2]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExpertError(f"reference expert file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds (pickle, zip, unpickling refused)
        raise ExpertError(f"reference expert file {path} is not a readable torch or safetensors file: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(data, dict) or not data:
        raise ExpertError(f"reference expert file {path} does not hold a dict of tensors")
    return data


def read_reference_logits(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's logit vectors keyed by the model's weight names (see the module docstring)."""
    path = Path(path)
    data = _read(path)
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ExpertError(f"reference expert file {path}: entry {key!r} is not a named tensor")
        if value.ndim != 1:
            raise ExpertError(f"reference expert file {path}: {key} has shape {tuple(value.shape)}, "
                              f"expected a vector")
    names = reference_matrix_names(model)
    if all(POLICY_KEY.match(k) for k in data):
        if len(data) != len(names):
            raise ExpertError(f"reference expert file {path} has {len(data)} vectors, the model has "
                              f"{len(names)} MLP weights; it was saved for another model")
        by_index = {int(POLICY_KEY.match(k).group(1)): v for k, v in data.items()}  # type: ignore[union-attr]
        if sorted(by_index) != list(range(len(names))):
            raise ExpertError(f"reference expert file {path}: indices of learnable_params_module_list are not "
                              f"0..{len(names) - 1}")
        return {names[i]: by_index[i] for i in range(len(names))}
    known = set(names)
    for key in data:
        if key not in known:
            raise ExpertError(f"reference expert file {path}: {key} is not an MLP weight of the model; "
                              f"it was saved for another model")
    missing = [n for n in names if n not in data]
    if missing:
        raise ExpertError(f"reference expert file {path} has no vector for {missing[0]} "
                          f"({len(missing)} of the model's {len(names)} MLP weights missing)")
    return {n: data[n] for n in names}


def import_reference_expert(ref_file: Path, model: nn.Module, *, out: Path, base_model: str | None = None,
                            task: str | None = None, label: str | None = None,
                            expect_fingerprint: str | None = None, cache_dir: Path | None = None,
                            progress: ProgressFn = no_progress) -> Path:
    """Convert the reference expert ``ref_file`` for ``model`` (its base weights) into the shoal
    expert ``out``; nothing is written when a check fails. ``task`` defaults to the file's stem."""
    ref_file = Path(ref_file)
    logits = read_reference_logits(ref_file, model)
    params = dict(model.named_parameters())
    for name, vector in logits.items():
        shape = tuple(params[name].shape) if name in params else ()
        if len(shape) != 2:
            raise ExpertError(f"reference expert file {ref_file}: {name} is not a 2-D weight of the model")
        if vector.numel() != min(shape):
            raise ExpertError(f"reference expert file {ref_file}: {name} has {vector.numel()} values, the model's "
                              f"matrix of shape {shape} has {min(shape)} singular values")
    factors = load_or_compute_svd(model, patterns=[f"^{re.escape(n)}$" for n in logits], cache_dir=cache_dir,
                                  progress=progress)
    if expect_fingerprint is not None and factors.fingerprint != expect_fingerprint:
        raise ExpertError(f"the model's MLP weights have fingerprint {factors.fingerprint}, expected "
                          f"{expect_fingerprint}")
    # as Policy.get_mask: sigmoid in the file's dtype (bfloat16 in the reference), then float32
    z = {n: torch.sigmoid(v).to(torch.float32) for n, v in logits.items()}
    meta = make_meta(factors, task=task or ref_file.stem, label=label, objective="reinforce",
                     parametrization="reference", base_model=base_model)
    return save_expert(Path(out), z, meta)
