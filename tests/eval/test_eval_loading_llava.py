"""The ``llava`` model kind: LlavaForConditionalGeneration + its processor, detected from config.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.errors import CheckpointError
from shoal.eval.loading import MODEL_KINDS, detect_kind, load_model, load_network, load_processor, locate_model
from tiny_llava import build_llava, build_llm


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava_kind")
    base = build_llm(root / "base", seed=0)
    return {"llm": base, "vlm": build_llava(root / "vlm", base, seed=2)}


def test_llava_folder_loads_as_llava_without_naming_the_kind(folders) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    assert detect_kind(locate_model(folders["vlm"])) == "llava"
    model, processor = load_model(folders["vlm"])
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    assert processor.tokenizer.padding_side == "left" and processor.tokenizer.pad_token == "<pad>"
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    images = [Image.new("RGB", (8, 8), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))]
    batch = processor(images=images, text=["<image> w1", "<image> w1 w2 w3"], padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    assert ids.shape[0] == 2 and ids[0, 0].item() == processor.tokenizer.pad_token_id  # padded on the left
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 2)
    # the batched rows answer as they would alone
    alone = processor(images=images[1:], text=["<image> w1 w2 w3"], return_tensors="pt")
    with torch.no_grad():
        single = model.generate(**alone, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[1, -2:], single[0, -2:])


def test_kind_named_or_detected_gives_the_same_weights(folders) -> None:  # type: ignore[no-untyped-def]
    detected = load_network(folders["vlm"])
    named = load_network(folders["vlm"], kind="llava")
    for (name, a), (_, b) in zip(detected.state_dict().items(), named.state_dict().items()):
        assert torch.equal(a, b), name
    assert type(load_processor(folders["vlm"])).__name__ == "LlavaProcessor"


def test_a_causal_lm_folder_still_loads_as_before(folders) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    assert detect_kind(locate_model(folders["llm"])) == "causal_lm"
    model, tokenizer = load_model(folders["llm"])
    reference = AutoModelForCausalLM.from_pretrained(folders["llm"], dtype=torch.float32)
    assert type(model) is type(reference)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.padding_side == "left" and type(tokenizer).__name__ != "LlavaProcessor"
    assert set(MODEL_KINDS) >= {"causal_lm", "llava"}


def test_a_llava_folder_without_processor_files_is_one_clear_error(folders, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folders["vlm"] / name, bare / name)
    with pytest.raises(CheckpointError, match=str(bare)):
        load_processor(bare)
