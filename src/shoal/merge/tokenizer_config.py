"""A recipe's ``tokenizer:`` block, as mergekit documents it ("Modern Configuration").

``source``: ``union`` (the default), ``base``, or one of the recipe's models: what the output
vocabulary is. ``tokens``: per token, where its embedding and ``lm_head`` rows come from in
models that lack it (``source``: a model name, ``{kind: model_token, model, token | token_id}``
or ``{kind: zero}``), and with ``force: true`` in every model, also those that have it; a token
the output vocabulary lacks is added. ``pad_to_multiple_of``: the vocabulary rows are padded to
a multiple of this (new rows: the mean of each model's rows).

How the rows are built from these is :mod:`shoal.merge.tokenizer_merge`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZeroEmbedding(_Strict):
    """``{kind: zero}``: the token's rows are zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """``{kind: model_token, model, token | token_id}``: another token's row of one model."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenEmbedding":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source needs exactly one of 'token' or 'token_id'")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {self.token_id}")
        return self


EmbeddingSource = Union[Annotated[Union[ZeroEmbedding, ModelTokenEmbedding], Field(discriminator="kind")], str]


class TokenSetting(_Strict):
    """Where one token's rows come from (``source``), and whether every model takes them (``force``)."""

    source: EmbeddingSource | None = None
    force: bool = False

    def source_model(self) -> str | None:
        """The model whose rows the setting reads, if any."""
        if isinstance(self.source, ModelTokenEmbedding):
            return self.source.model
        return self.source if isinstance(self.source, str) else None


class TokenizerBlock(_Strict):
    """The ``tokenizer:`` block: ``source``, ``tokens`` and ``pad_to_multiple_of``."""

    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
