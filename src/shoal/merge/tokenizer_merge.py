"""Merging models whose vocabularies differ: the output tokenizer, and embedding rows aligned by token.

What mergekit 0.1.5 does with ``tokenizer_source`` / the ``tokenizer:`` block, read from its
documentation and code and written anew here:

- **The output vocabulary.** ``base``: the base model's tokenizer (the recipe's
  ``base_model``, else its first model). A model name: that model's tokenizer. ``union``: the
  base's tokenizer plus, appended as added tokens, every token of the other models the base
  lacks (ids below the model's ``vocab_size`` only), then the other models' added tokens
  (special tokens with their settings). Tokens named under ``tokenizer.tokens`` that the
  vocabulary still lacks are appended last. With ``pad_to_multiple_of`` the row count is
  rounded up to a multiple of it.
- **The rows.** Every tensor with one row per token (token embeddings, ``lm_head``) is rebuilt
  for each model in the output's token order before the merge method sees it: a token the model
  has takes its own row. A token it lacks takes, in this order: the token's ``tokens`` setting
  (``source`` a model: that model's row of the token; ``{kind: model_token}``: a given token's
  row of a model; ``{kind: zero}``: zeros); if exactly one model has it, that model's row; if
  none, zeros; if the base has it, the base's row; else the mean of the rows of the models that
  have it. ``force: true`` gives every model the setting's row, also those that have the token.
  Padding rows are the mean of the model's rows. "The models" are those the output tensor is
  merged from (for ``slices``: the first slice's for the embeddings, the last's for
  ``lm_head``), as mergekit takes them.

One difference, by necessity: mergekit appends a ``union``'s new tokens in the iteration order
of the tokenizers library's vocabulary map, which changes from run to run; shoal appends them
in id order of the model they come from (models in recipe order), so a merge is reproducible.
The token set, every row by token and the ids of the base's tokens are mergekit's.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from shoal.checkpoint import CheckpointReader, describe_tensor
from shoal.checkpoint.dtypes import name_of, torch_dtype
from shoal.checkpoint.lazy_torch import torch
from shoal.errors import CheckpointError, MergeError, RecipeError
from shoal.merge.model_view import architecture
from shoal.merge.recipe import Recipe
from shoal.merge.tokenizer_config import TokenSetting

# files a saved tokenizer replaces in the output folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                   "merges.txt")

Key = tuple[str, str]  # (model, tensor name inside that model)


def settings_of(recipe: Recipe) -> tuple[str, dict[str, TokenSetting], int | None] | None:
    """``(source, tokens, pad_to_multiple_of)`` of the recipe, or None when it sets no tokenizer."""
    if recipe.tokenizer is not None:
        block = recipe.tokenizer
        return block.source, dict(block.tokens or {}), block.pad_to_multiple_of
    if recipe.tokenizer_source is not None:
        return recipe.tokenizer_source, {}, None
    return None


def _folder(reader: CheckpointReader) -> Path:
    path = Path(reader.path)
    return path if path.is_dir() else path.parent


def _load_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: cannot load its tokenizer: {str(exc).splitlines()[0][:200]}") from None


def _config_vocab_size(reader: CheckpointReader) -> int | None:
    config = reader.config or {}
    for section in (config, config.get("text_config") or {}):
        if isinstance(section, dict) and isinstance(section.get("vocab_size"), int):
            return int(section["vocab_size"])
    return None


def _copy(tokenizer):  # type: ignore[no-untyped-def]
    """A fresh copy of a tokenizer (saved and loaded again), so adding tokens leaves the original alone."""
    with tempfile.TemporaryDirectory(prefix="shoal_tok_") as tmp:
        tokenizer.save_pretrained(tmp)
        return _load_tokenizer(Path(tmp))


def _union(base_key: str, order: Sequence[str], tokenizers: Mapping[str, Any], sizes: Mapping[str, int]):  # type: ignore[no-untyped-def]
    """The base tokenizer plus the tokens of the other models it lacks, then their added tokens."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key in order:
        tokenizer = tokenizers[key]
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if index < sizes[key]:
                plain.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index < sizes[key]:
                added.setdefault(info.content, info)
    out = _copy(tokenizers[base_key])
    base_vocab = tokenizers[base_key].get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary and, per model, which of its rows each output token takes.

    ``rows[model][i]``: the model's row for output token ``i``, or -1 when it lacks the token.
    ``aligned[model]``: the model's tensors with one row per token (rebuilt before merging).
    ``groups``: per (model, tensor), the sources of the output tensor it is merged into (set
    by :meth:`bind` once the plan is made).
    """

    tokens: tuple[str, ...]
    size: int
    rows: Mapping[str, tuple[int, ...]]
    originals: Mapping[str, Mapping[str, int]]
    aligned: Mapping[str, frozenset[str]]
    settings: Mapping[str, TokenSetting]
    base: str | None
    dtype: torch.dtype | None
    tokenizer: Any = field(compare=False, repr=False)
    groups: Mapping[Key, tuple[Key, ...]] = field(default_factory=dict)

    def bind(self, ops: Sequence[Any]) -> "Vocabulary":
        """This vocabulary with the tensor groups of the plan's ``ops`` (see ``groups``)."""
        groups: dict[Key, tuple[Key, ...]] = {}
        for op in ops:
            keys = tuple(dict.fromkeys((ref.model, ref.tensor) for ref in op.sources))
            for key in keys:
                if key[1] in self.aligned.get(key[0], ()):
                    groups.setdefault(key, keys)
        return replace(self, groups=groups)

    def wrap(self, readers: Mapping[str, CheckpointReader]) -> dict[str, "AlignedReader"]:
        """Readers that show every model's per-token tensors in the output vocabulary."""
        cache = _GroupCache(self, readers)
        return {key: AlignedReader(reader, key, self, cache) for key, reader in readers.items()}

    def save(self, out_dir: Path) -> None:
        """Write the output tokenizer into ``out_dir`` in place of any tokenizer files there."""
        for name in TOKENIZER_FILES:
            (out_dir / name).unlink(missing_ok=True)
        self.tokenizer.save_pretrained(str(out_dir))

    def aligned_group(self, group: tuple[Key, ...], readers: Mapping[str, CheckpointReader]) -> dict[Key, torch.Tensor]:
        """Every member of ``group`` rebuilt in the output vocabulary (see the module docstring)."""
        from shoal.merge.vocab_rows import align_rows

        return align_rows(self, group, readers)


class _GroupCache:
    """Rebuilt tensors of the group last computed, handed out once each (threads may ask at once)."""

    def __init__(self, vocabulary: Vocabulary, readers: Mapping[str, CheckpointReader]) -> None:
        self.vocabulary = vocabulary
        self.readers = readers
        self.lock = threading.Lock()
        self.ready: dict[Key, torch.Tensor] = {}

    def get(self, key: Key) -> torch.Tensor:
        with self.lock:
            if key not in self.ready:
                group = self.vocabulary.groups.get(key, (key,))
                self.ready = self.vocabulary.aligned_group(group, self.readers)
            return self.ready.pop(key)


class AlignedReader:
    """A checkpoint reader whose per-token tensors come rebuilt in the output vocabulary; the rest as stored."""

    def __init__(self, reader: CheckpointReader, key: str, vocabulary: Vocabulary, cache: _GroupCache) -> None:
        self._reader = reader
        self._key = key
        self._vocabulary = vocabulary
        self._cache = cache
        self._aligned = vocabulary.aligned.get(key, frozenset())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._reader.shape(name)
        return (self._vocabulary.size, *shape[1:]) if name in self._aligned else shape

    def dtype(self, name: str) -> torch.dtype:
        if name in self._aligned and self._vocabulary.dtype is not None:
            return self._vocabulary.dtype
        return self._reader.dtype(name)

    def dtype_name(self, name: str) -> str:
        if name in self._aligned and self._vocabulary.dtype is not None:
            return name_of(self._vocabulary.dtype)
        return self._reader.dtype_name(name)

    def nbytes(self, name: str) -> int:
        count = 1
        for dim in self.shape(name):
            count *= dim
        return count * torch.tensor([], dtype=self.dtype(name)).element_size()

    def can_read_range(self, name: str) -> bool:
        return name not in self._aligned and self._reader.can_read_range(name)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            check_finite: bool = True) -> torch.Tensor:
        if name not in self._aligned:
            return self._reader.get(name, dtype=dtype, device=device, check_finite=check_finite)
        tensor = self._cache.get((self._key, name)).to(self.dtype(name))
        return tensor.to(device=device, dtype=dtype or tensor.dtype)


def plan_vocabulary(recipe: Recipe, readers: Mapping[str, CheckpointReader]) -> tuple[Vocabulary | None, list[str]]:
    """The recipe's output vocabulary (None when it sets no tokenizer) and warnings for the plan."""
    settings = settings_of(recipe)
    if settings is None:
        return None, []
    source, tokens, pad = settings
    order = recipe.source_models()
    base_key = order[0]
    if source not in ("union", "base") and source not in order:
        raise RecipeError(f"tokenizer source {source!r} is neither 'union', 'base' nor one of the recipe's models")
    for token, setting in tokens.items():
        model = setting.source_model()
        if model is not None and model not in order:
            raise RecipeError(f"tokenizer.tokens.{token}: source model {model!r} is not one of the recipe's models")
        if setting.source is None and setting.force:
            raise RecipeError(f"tokenizer.tokens.{token}: force needs a source")
    warnings: list[str] = []
    tokenizers: dict[str, Any] = {}
    for key in order:
        folder = _folder(readers[key])
        if any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tokenizers[key] = _load_tokenizer(folder)
        elif key == base_key:
            raise CheckpointError(f"{folder}: no tokenizer files, and a recipe that sets a tokenizer aligns every "
                                  f"model's vocabulary to its base model's ({key}) tokenizer")
        else:  # as mergekit assumes
            warnings.append(f"{key} has no tokenizer files: its vocabulary is taken to be {base_key}'s")
    sizes = {key: _config_vocab_size(readers[key]) or len(tokenizers.get(key, tokenizers[base_key]).get_vocab())
             for key in order}
    beyond = [t for t, i in tokenizers[base_key].get_vocab().items() if i >= sizes[base_key]]
    if beyond:
        raise MergeError(f"{base_key}: its tokenizer has {len(beyond)} tokens at ids beyond the model's "
                         f"vocab_size {sizes[base_key]} (e.g. {beyond[0]!r}); shoal does not strip them")
    if source == "union":
        out = _union(base_key, [k for k in order if k in tokenizers], tokenizers, sizes)
    else:
        out = _copy(tokenizers[base_key if source == "base" else source])
    existing = set(out.get_vocab())
    for token in tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in ordered] != list(range(len(ordered))):
        raise MergeError(f"the output tokenizer's ids are not 0..{len(ordered) - 1} without gaps; "
                         "shoal cannot lay its rows out")
    size = len(ordered)
    if pad and size % pad:
        size += pad - size % pad
    rows: dict[str, tuple[int, ...]] = {}
    originals: dict[str, Mapping[str, int]] = {}
    aligned: dict[str, frozenset[str]] = {}
    for key in order:
        model_vocab = tokenizers.get(key, tokenizers[base_key]).get_vocab()
        originals[key] = model_vocab
        rows[key] = tuple(model_vocab[t] if t in model_vocab and model_vocab[t] < sizes[key] else -1 for t in ordered)
        aligned[key] = _per_token_tensors(readers[key], sizes[key])
    dtype = torch_dtype(recipe.dtype) if recipe.dtype else None
    return Vocabulary(tokens=tuple(ordered), size=size, rows=rows, originals=originals, aligned=aligned,
                      settings=tokens, base=recipe.base_model, dtype=dtype, tokenizer=out), warnings


def _per_token_tensors(reader: CheckpointReader, vocab_size: int) -> frozenset[str]:
    """Token embeddings and ``lm_head``: 2-d tensors of those roles with one row per token."""
    arch = architecture(reader.config or {})
    names = set()
    for name in reader.tensor_names():
        shape = reader.shape(name)
        if len(shape) == 2 and shape[0] == vocab_size and describe_tensor(name, arch).role in ("embed", "lm_head"):
            names.add(name)
    return frozenset(names)


__all__ = ["AlignedReader", "Vocabulary", "plan_vocabulary", "settings_of"]
