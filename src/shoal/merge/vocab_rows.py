"""Rebuild per-token tensors (embeddings, ``lm_head``) of a group of models in the output vocabulary.

The rules are those of :mod:`shoal.merge.tokenizer_merge` (mergekit 0.1.5's). A group is the
sources of one output tensor: a token some of them lack gets its rows from the token's setting,
the one model that has it, the base, or the mean over the models that have it, computed in the
recipe's dtype (else the sources' common dtype) in the order mergekit sums them, so the rows
agree bitwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from shoal.checkpoint import CheckpointReader
from shoal.errors import MergeError
from shoal.merge.tokenizer_config import ModelTokenEmbedding, TokenSetting, ZeroEmbedding

if TYPE_CHECKING:
    from shoal.merge.tokenizer_merge import Key, Vocabulary


def _sources(vocabulary: "Vocabulary", models: list[str]) -> tuple[dict[str, TokenSetting], set[str]]:
    """Each token's setting (the recipe's, else the one implied), and the tokens whose rows are a mean."""
    settings = dict(vocabulary.settings)
    averaged: set[str] = set()
    for i, token in enumerate(vocabulary.tokens):
        if token in settings:
            continue
        having = [m for m in models if vocabulary.rows[m][i] >= 0]
        if len(having) == 1:
            settings[token] = TokenSetting(source=having[0])
        elif not having:
            settings[token] = TokenSetting(source=ZeroEmbedding(kind="zero"))
        elif vocabulary.base in models and vocabulary.rows[vocabulary.base][i] >= 0:
            settings[token] = TokenSetting(source=vocabulary.base)
        else:
            averaged.add(token)
    return settings, averaged


def _setting_row(vocabulary: "Vocabulary", tensors: Mapping[str, torch.Tensor], token: str, index: int,
                 setting: TokenSetting, where: str) -> torch.Tensor:
    source = setting.source
    first = next(iter(tensors.values()))
    if isinstance(source, ZeroEmbedding):
        return first.new_zeros(first.shape[1:])
    model = setting.source_model()
    if model is None:
        raise MergeError(f"{where}: token {token!r} has no row source (give tokenizer.tokens.{token}.source)")
    if model not in tensors:
        raise MergeError(f"{where}: token {token!r} takes its row from {model}, which this tensor is not "
                         "merged from")
    if isinstance(source, ModelTokenEmbedding):
        row = source.token_id
        if row is None:
            if source.token not in vocabulary.originals[model]:
                raise MergeError(f"{where}: token {source.token!r} is not in {model}'s vocabulary")
            row = vocabulary.originals[model][source.token]
        if row >= tensors[model].shape[0]:
            raise MergeError(f"{where}: token id {row} is beyond the {tensors[model].shape[0]} rows of {model}")
        return tensors[model][row]
    row = vocabulary.rows[model][index]
    if row < 0:
        raise MergeError(f"{where}: token {token!r} is not in {model}'s vocabulary")
    return tensors[model][row]


def align_rows(vocabulary: "Vocabulary", group: tuple["Key", ...],
               readers: Mapping[str, CheckpointReader]) -> dict["Key", torch.Tensor]:
    """Every (model, tensor) of ``group`` as a tensor of ``vocabulary.size`` rows in output token order."""
    raw = {key: readers[key[0]].get(key[1]) for key in group}
    dtype = vocabulary.dtype
    if dtype is None:
        dtype = raw[group[0]].dtype
        for tensor in raw.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
    tensors = {key[0]: tensor.to(dtype) for key, tensor in raw.items()}
    models = list(tensors)
    where = f"tensor {group[0][1]!r}"
    settings, averaged = _sources(vocabulary, models)
    defaults: dict[str, torch.Tensor] = {}
    for i, token in enumerate(vocabulary.tokens):
        setting = settings.get(token)
        forced = setting is not None and setting.force
        if not forced and all(vocabulary.rows[m][i] >= 0 for m in models):
            continue
        if token in averaged:
            total = torch.zeros(tensors[models[0]].shape[1:], dtype=dtype)
            count = 0
            for model in models:
                if vocabulary.rows[model][i] >= 0:
                    total = total + tensors[model][vocabulary.rows[model][i]]
                    count += 1
            defaults[token] = total / count
        elif setting is not None:
            defaults[token] = _setting_row(vocabulary, tensors, token, i, setting, where)
    count = len(vocabulary.tokens)
    index_of = {token: i for i, token in enumerate(vocabulary.tokens)}
    forced = [index_of[t] for t, s in settings.items() if s.force and t in index_of]
    out: dict["Key", torch.Tensor] = {}
    for key in group:
        model = key[0]
        source = tensors[model]
        rows = torch.tensor(vocabulary.rows[model], dtype=torch.long)
        keep = rows >= 0
        if forced:
            keep[forced] = False
        rebuilt = torch.zeros((vocabulary.size, *source.shape[1:]), dtype=dtype)
        present = torch.nonzero(keep).reshape(-1)
        rebuilt[present] = source[rows[present]]
        for i in torch.nonzero(~keep).reshape(-1).tolist():
            token = vocabulary.tokens[i]
            if token in defaults:
                rebuilt[i] = defaults[token]
        if vocabulary.size > count:  # padding rows: the mean of the model's token rows
            rebuilt[count:] = torch.mean(rebuilt[:count], dim=0)
        out[key] = rebuilt
    return out
