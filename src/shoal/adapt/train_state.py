"""The resumable state of an SVF training run: ``<out>.train-state.pt`` next to the expert file.

The state holds the trainable vectors, the optimizer state, the step, the best z so far and
its score, the base score and the validation history, plus what it belongs to: the base
fingerprint, the objective, the parametrization and the task. It is written atomically
(a temporary file renamed over the old one), so a killed run leaves the previous state or the
new one, never half a file.

Reading it checks everything before training continues: a file torch cannot read (truncated,
garbage, a pickle of something other than tensors), one written for another base, objective,
parametrization or task, or one whose vectors do not fit the adapted matrices (missing, of
another length, NaN) is a ConfigError naming the file and saying to remove it or pass
``resume=False``.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from shoal.errors import ConfigError

_ADAM_BUFFERS = ("exp_avg", "exp_avg_sq")


def state_path(out: Path) -> Path:
    """Where the resumable training state of the expert ``out`` lives."""
    return out.with_name(out.name + ".train-state.pt")


def _refuse(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"training state {path} {problem}; remove it or pass resume=False")


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` through a temporary file in the same folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state(path: Path, *, fingerprint: str, objective: str, parametrization: str, task: str,
               ranks: Mapping[str, int]) -> dict[str, Any]:
    """The state at ``path``, checked against the run (``ranks``: matrix name -> z length)."""
    if path.is_dir():
        raise _refuse(path, "is a folder, not a file")
    try:
        with warnings.catch_warnings():  # torch warns on its way to refusing a pickle it will not run
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch.load fails in many ways on a bad file
        raise _refuse(path, f"is unreadable ({_reason(err)})") from None
    if not isinstance(state, dict):
        raise _refuse(path, f"holds a {type(state).__name__}, not a training state")
    for key, kind in (("fingerprint", str), ("objective", str), ("step", int), ("params", dict),
                      ("optimizer", dict), ("best_z", dict), ("best_score", (int, float)), ("best_step", int),
                      ("base_score", (int, float)), ("history", list)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise _refuse(path, f"has no valid {key!r}")
    found = (state["fingerprint"], state["objective"], state.get("parametrization", "direct"),
             state.get("task", task))
    if found != (fingerprint, objective, parametrization, task):
        raise _refuse(path, f"belongs to another run (base {found[0]}, objective {found[1]}, parametrization "
                            f"{found[2]}, task {found[3]}; this run: {fingerprint}, {objective}, "
                            f"{parametrization}, {task})")
    if state["step"] < 0 or not 0 <= state["best_step"] <= state["step"]:
        raise _refuse(path, f"has step {state['step']} and best step {state['best_step']}")
    for key in ("best_score", "base_score"):
        if not math.isfinite(state[key]):
            raise _refuse(path, f"has {key} {state[key]}")
    for key in ("params", "best_z"):
        _check_vectors(path, key, state[key], ranks)
    for record in state["history"]:
        if not (isinstance(record, dict) and set(record) == {"step", "loss", "validation"}
                and all(isinstance(v, (int, float)) for v in record.values())):
            raise _refuse(path, f"has a history record {str(record)[:60]} that is not step, loss, validation")
    return state


def _reason(err: Exception) -> str:
    """What torch.load's failure means for a state file, in a few words (its own messages run
    to several sentences about ``weights_only``)."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return "not a torch file of tensors; it was not written by shoal"
    if isinstance(err, EOFError) or "central directory" in str(err):
        return "empty or truncated"
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return " ".join(str(err).split("\n")[0].split())[:100] or type(err).__name__


def _check_vectors(path: Path, key: str, vectors: Mapping[str, Any], ranks: Mapping[str, int]) -> None:
    if set(vectors) != set(ranks):
        odd = sorted(set(vectors) ^ set(ranks))[0]
        raise _refuse(path, f"{key} does not cover the adapted matrices (first difference: {odd})")
    for name, vector in vectors.items():
        if not isinstance(vector, torch.Tensor) or not vector.dtype.is_floating_point:
            raise _refuse(path, f"{key} of {name} is not a floating-point tensor")
        if tuple(vector.shape) != (ranks[name],):
            raise _refuse(path, f"{key} of {name} has shape {tuple(vector.shape)}, expected ({ranks[name]},)")
        if not bool(torch.isfinite(vector).all()):
            raise _refuse(path, f"{key} of {name} holds NaN or infinite values")


def restore_optimizer(path: Path, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load ``state`` into ``optimizer``; its Adam buffers must fit the parameters."""
    try:
        optimizer.load_state_dict(dict(state))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        raise _refuse(path, f"has an optimizer state that does not fit ({' '.join(str(err).split())[:100]})") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            buffers = optimizer.state.get(param, {})
            for key in _ADAM_BUFFERS:
                value = buffers.get(key)
                if value is not None and (not isinstance(value, torch.Tensor) or value.shape != param.shape
                                          or not bool(torch.isfinite(value).all())):
                    raise _refuse(path, f"has an optimizer {key} that does not fit its parameter")
