"""The one model loader: a model reference in, a model (and its tokenizer) out, ready to evaluate.

Every caller that needs a model in memory comes here (``shoal eval``, the evolve evaluators
and resident candidates, the adapt study): references resolve through
:func:`shoal.checkpoint.references.resolve_reference` (folders, hub ids with ``@revision``,
``zoo:`` names, run folders), and the model kind says which classes build it. A PEFT adapter
folder (``adapter_config.json``) loads as its base model (any shoal reference) with the
adapter applied. Two kinds are built in: ``causal_lm`` (``AutoModelForCausalLM`` + its tokenizer)
and ``llava`` (``LlavaForConditionalGeneration`` + its ``AutoProcessor``); a diffusion kind
registers its own :class:`ModelKind` (how to build the network, how to build its processor).
When a caller names no kind, a local folder's ``config.json`` ``model_type`` picks it
(:data:`KIND_OF_MODEL_TYPE`); anything else is a causal language model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import torch

from shoal.checkpoint.references import ModelLocation, resolve_reference
from shoal.errors import CheckpointError


@dataclass(frozen=True)
class ModelKind:
    """How one kind of model is built from a folder or hub id.

    ``network(source, revision, dtype)`` returns the model, ``processor(source, revision)`` what
    turns inputs into its tensors (a tokenizer for language models), ready for batched use.
    """

    name: str
    network: Callable[[str, str | None, torch.dtype], Any]
    processor: Callable[[str, str | None], Any]


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


MODEL_TYPE_GROUP = "shoal.model_types"


def register_model_type(source: str) -> None:
    """Teach transformers a model type that a shoal package provides, before loading ``source``.

    Packages above eval (``shoal.flow``'s layer-path models) declare an entry point in the group
    ``shoal.model_types`` named after the ``model_type`` they register; it is called when a local
    folder's config.json names that type, so such folders load without remote code and eval
    never imports the package that provides them.
    """
    config = Path(source) / "config.json"
    if not config.is_file():
        return
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports an unreadable config with its own message
    for entry in entry_points(group=MODEL_TYPE_GROUP):
        if entry.name == model_type:
            entry.load()()


ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def adapter_base(source: str) -> str | None:
    """The base model a PEFT adapter folder names (``base_model_name_or_path`` in its
    ``adapter_config.json``), or None when ``source`` is not an adapter folder."""
    path = Path(source) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: cannot read the adapter config ({_first_line(err)})") from err
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{path}: names no base model (base_model_name_or_path)")
    return base


def _base_source(adapter: str, base: str) -> str:
    """What transformers opens for an adapter's base: any shoal reference, resolved."""
    try:
        return _source(locate_model(base))
    except CheckpointError as err:
        raise CheckpointError(f"{adapter}: its base model {base!r} cannot be found ({err})") from None


def _causal_lm(source: str, revision: str | None, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    base = adapter_base(source)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype)
    try:
        from peft import PeftModel
    except ImportError:
        raise CheckpointError(f"{source}: a PEFT adapter needs PEFT: pip install 'shoal[peft]'") from None
    network = AutoModelForCausalLM.from_pretrained(_base_source(source, base), dtype=dtype)
    adapted = PeftModel.from_pretrained(network, source)
    # LoRA-style adapters fold into the weights: the plain model generates as fast as the base
    return adapted.merge_and_unload() if hasattr(adapted, "merge_and_unload") else adapted


def _tokenizer(source: str, revision: str | None) -> Any:
    from transformers import AutoTokenizer

    base = adapter_base(source)
    if base is not None and not any((Path(source) / name).is_file() for name in _TOKENIZER_FILES):
        source = _base_source(source, base)  # an adapter saved without its tokenizer
    return prepare_tokenizer(AutoTokenizer.from_pretrained(source, revision=revision))


def _llava(source: str, revision: str | None, dtype: torch.dtype) -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(source, revision=revision, dtype=dtype)


def _llava_processor(source: str, revision: str | None) -> Any:
    """The VLM's processor (image processor + tokenizer), its tokenizer padded on the left with a pad token."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source, revision=revision)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise CheckpointError(f"{source}: its processor has no tokenizer (processor_config.json and "
                              "the tokenizer files belong beside the weights)")
    prepare_tokenizer(tokenizer)
    return processor


MODEL_KINDS: dict[str, ModelKind] = {"causal_lm": ModelKind("causal_lm", _causal_lm, _tokenizer),
                                     "llava": ModelKind("llava", _llava, _llava_processor)}

# config.json model_type -> the kind that loads it when the caller names none
KIND_OF_MODEL_TYPE: dict[str, str] = {"llava": "llava"}


def register_model_kind(kind: ModelKind, *, replace: bool = False) -> None:
    """Make ``kind.name`` a kind the loader accepts."""
    if kind.name in MODEL_KINDS and not replace and MODEL_KINDS[kind.name] is not kind:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    MODEL_KINDS[kind.name] = kind


def _kind(name: str) -> ModelKind:
    kind = MODEL_KINDS.get(name)
    if kind is None:
        raise CheckpointError(f"unknown model kind {name!r}; known: {', '.join(MODEL_KINDS)}")
    return kind


def locate_model(reference: str | Path | ModelLocation, *, revision: str | None = None) -> ModelLocation:
    """Where the model ``reference`` names lives: a local model folder or a hub id.

    A path that does not exist, or names a file, raises CheckpointError naming it.
    """
    if isinstance(reference, ModelLocation):
        return reference
    text = str(reference)
    looks_local = (isinstance(reference, Path) or text.startswith((".", "/", "~"))
                   or (":" not in text and text.count("/") > 1))
    if looks_local and not Path(text).expanduser().exists():
        raise CheckpointError(f"{text}: no such model folder")
    location = resolve_reference(reference, revision=revision)
    if location.path is not None and not location.path.is_dir():
        raise CheckpointError(f"{location.path}: expected a model folder, found a file")
    return location


def detect_kind(location: ModelLocation) -> str:
    """The model kind of a located model: by its config.json ``model_type`` for a local folder
    (:data:`KIND_OF_MODEL_TYPE`), ``causal_lm`` otherwise (hub ids, PEFT adapters, unknown types)."""
    if location.path is None:
        return "causal_lm"
    try:
        config = json.loads((Path(location.path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "causal_lm"  # transformers reports a missing or unreadable config with its own message
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return KIND_OF_MODEL_TYPE.get(model_type, "causal_lm") if isinstance(model_type, str) else "causal_lm"


def _source(location: ModelLocation) -> str:
    """What transformers opens for ``location``, with any model type shoal provides registered."""
    if location.path is not None:
        register_model_type(str(location.path))
        return str(location.path)
    return str(location.hub_id)


def load_network(reference: str | Path | ModelLocation, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, kind: str | None = None,
                 revision: str | None = None) -> Any:
    """The model ``reference`` names, in eval mode on ``device`` (no tokenizer); ``kind`` None
    detects it (:func:`detect_kind`)."""
    location = locate_model(reference, revision=revision)
    builder = _kind(kind if kind is not None else detect_kind(location))
    source = _source(location)
    try:
        model = builder.network(source, location.revision, dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{source}: cannot load the model ({_first_line(err)})") from err
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise CheckpointError(f"{source}: cannot move the model to {device!s} ({_first_line(err)})"
                              ) from err
    return model.eval()


def load_processor(reference: str | Path | ModelLocation, *, kind: str | None = None,
                   revision: str | None = None) -> Any:
    """What feeds the model ``reference`` names; for a causal LM its tokenizer, for a VLM its
    processor, the tokenizer padding on the left and with a pad token. ``kind`` None detects it."""
    location = locate_model(reference, revision=revision)
    builder = _kind(kind if kind is not None else detect_kind(location))
    source = _source(location)
    try:
        return builder.processor(source, location.revision)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot load the tokenizer ({_first_line(err)})") from err


def load_model(reference: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, kind: str | None = None,
               revision: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a model reference (folder, hub id[@revision], ``zoo:``...);
    for a VLM ``(model, processor)``. ``kind`` None detects it (:func:`detect_kind`).

    The model is in eval mode on ``device``; the tokenizer pads on the left and has a pad token,
    which is also the model's generation pad token when its generation config has none.
    A reference that cannot be read raises :class:`~shoal.errors.CheckpointError` naming it.
    """
    location = locate_model(reference, revision=revision)
    kind = kind if kind is not None else detect_kind(location)
    tokenizer = load_processor(location, kind=kind)
    model = load_network(location, device=device, dtype=dtype, kind=kind)
    generation = getattr(model, "generation_config", None)
    pad_token_id = getattr(getattr(tokenizer, "tokenizer", tokenizer), "pad_token_id", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = pad_token_id
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
