"""Tests for the answers part of ch07/gpt_instruction_finetuning.py (sections 7.6-7.7): cutting the answer out of the generated text, and the fine-tuned
model's files (weights + config) round trip."""

import torch

from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch07.gpt_instruction_finetuning import (
    extract_response,
    format_input,
    load_finetuned_model,
    save_finetuned_model,
)

WITHOUT_INPUT = {"instruction": "Name a color.", "input": "", "output": "Blue."}


def test_extract_response():
    prompt = format_input(WITHOUT_INPUT)
    generated = prompt + "\n\n### Response:\nBlue is a color.<|endoftext|>"
    assert extract_response(generated, prompt) == "Blue is a color."
    assert extract_response(prompt + "\n\n### Response:\n  Red.  \n", prompt) == "Red."
    assert extract_response(prompt + " no header here", prompt) == "no header here"
    assert extract_response(prompt + "\n\n### Response:\n### Response:\nRed.", prompt) == "Red."
    assert extract_response(prompt, prompt) == ""
    # Stops at the first end-of-text token, even if more text follows.
    assert extract_response(prompt + "\n### Response:\nA<|endoftext|>B", prompt) == "A"
    phi3 = format_input(WITHOUT_INPUT, "phi3")
    assert extract_response(phi3 + "\n<|assistant|>\nGreen.<|endoftext|>", phi3, "phi3") == "Green."


def test_save_and_load_finetuned_model(tmp_path):
    torch.manual_seed(123)
    cfg = {**GPT_CONFIG_124M, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}
    model = GPTModel(cfg).eval()
    path = save_finetuned_model(model, tmp_path / "m-sft.pth", style="alpaca")
    loaded, meta = load_finetuned_model(path)
    assert meta == {"config": cfg, "style": "alpaca"} and not loaded.training
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(x), model(x))
    (tmp_path / "m-sft.json").write_text("{ not json")
    import pytest

    with pytest.raises(ValueError, match="not valid JSON"):
        load_finetuned_model(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_finetuned_model(tmp_path / "missing.pth")
