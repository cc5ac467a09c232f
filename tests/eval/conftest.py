"""Fixtures for the evaluation tests: a word-level tokenizer and a tiny random Llama, built locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = ("<pad> <s> </s> <unk> zero one two three four five six seven eight nine ten plus minus "
         "is what answer the a cat dog red blue green yes no . ? ; : - = end stop").split()


def make_word_tokenizer():
    """A whitespace word-level tokenizer over ``WORDS`` with bos ``<s>``, eos ``</s>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_tiny_llama(seed: int = 0, init_std: float = 0.2):
    """A random 2-layer Llama over the word vocabulary; a large init makes greedy outputs vary
    from prompt to prompt instead of repeating one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=init_std, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def words() -> tuple[str, ...]:
    """The vocabulary of the word tokenizer, in id order."""
    return tuple(WORDS)


@pytest.fixture(scope="session")
def llama_factory():
    """``llama_factory(seed=0, init_std=0.2)`` -> a fresh tiny random Llama."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def word_tokenizer():
    from shoal.eval.loading import prepare_tokenizer

    return prepare_tokenizer(make_word_tokenizer())


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and its tokenizer saved as a Hugging Face folder."""
    out = tmp_path_factory.mktemp("eval_model") / "tiny"
    make_tiny_llama().save_pretrained(out)
    make_word_tokenizer().save_pretrained(out)
    return out
