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


def test_model_kinds_plug_into_the_one_loader(saved_tiny_model, monkeypatch):
    import shoal.eval.loading as loading

    built = []
    kind = loading.ModelKind("toy", lambda source, revision, dtype: built.append(("net", source, dtype))
                             or torch.nn.Linear(2, 2),
                             lambda source, revision: built.append(("proc", source)) or "processor")
    monkeypatch.setattr(loading, "MODEL_KINDS", dict(loading.MODEL_KINDS))
    loading.register_model_kind(kind)
    with pytest.raises(ValueError, match="already registered"):
        loading.register_model_kind(loading.ModelKind("toy", kind.network, kind.processor))
    network = loading.load_network(saved_tiny_model, kind="toy", dtype=torch.float64)
    assert isinstance(network, torch.nn.Linear) and not network.training
    assert loading.load_processor(saved_tiny_model, kind="toy") == "processor"
    assert built == [("net", str(saved_tiny_model), torch.float64), ("proc", str(saved_tiny_model))]
    with pytest.raises(CheckpointError, match="unknown model kind 'vlm'"):
        load_model(saved_tiny_model, kind="vlm")
