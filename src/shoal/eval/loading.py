"""Load a causal language model and its tokenizer, ready for batched evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shoal.errors import CheckpointError


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Make ``tokenizer`` fit for batched generation, in place: left padding, and a pad token
    (the eos token when the tokenizer has none). Returns the same tokenizer."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad token nor "
                "an eos token; set one of them in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path_or_id: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a Hugging Face model folder or hub id.

    The model is in eval mode on ``device``; the tokenizer pads on the left and has a pad token.
    A folder that cannot be read raises :class:`~shoal.errors.CheckpointError` naming it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(path_or_id)
    if source.startswith("zoo:"):
        from shoal.zoo import resolve_zoo_ref

        source = resolve_zoo_ref(source)
    local = Path(source)
    if local.exists() and not local.is_dir():
        raise CheckpointError(f"{source}: expected a model folder, found a file")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise CheckpointError(f"{source}: no such model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot load the tokenizer ({_first_line(err)})") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{source}: cannot load the model ({_first_line(err)})") from err
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise CheckpointError(f"{source}: cannot move the model to {device!s} ({_first_line(err)})"
                              ) from err
    model.eval()
    prepare_tokenizer(tokenizer)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
