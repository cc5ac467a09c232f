"""``load_model``: padding side, pad token, errors naming the folder."""

from __future__ import annotations

import pytest
import torch

from shoal.errors import CheckpointError
from shoal.eval import load_model


def test_loads_model_and_left_padding_tokenizer(saved_tiny_model, tiny_llama):
    model, tokenizer = load_model(saved_tiny_model)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    half, _ = load_model(saved_tiny_model, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tmp_path, tiny_llama, word_tokenizer):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(word_tokenizer.backend_tokenizer.to_str())
    no_pad = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>")
    folder = tmp_path / "no_pad"
    tiny_llama.save_pretrained(folder)
    no_pad.save_pretrained(folder)
    _, tokenizer = load_model(folder)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2


def test_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "missing")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a model folder"):
        load_model(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=str(empty)):
        load_model(empty)
