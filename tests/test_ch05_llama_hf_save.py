"""ch05.llama.hf_save: our models written back as Hugging Face folders that transformers loads."""

import json

import pytest
import torch

from ch05.llama.generate_llm import load_llm
from ch05.llama.hf_save import ours_to_hf, save_hf_folder
from ch05.llama.llama3 import hf_to_ours
from hf_tiny import model_dir_fixture


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "qwen3_moe"])
def test_saved_folder_loads_in_transformers_with_our_logits(tmp_path_factory, family):
    from transformers import AutoModelForCausalLM

    src, _ = model_dir_fixture(tmp_path_factory, family)
    model = load_llm(src, dtype=torch.float32, decoding_layout=False).model
    with torch.no_grad():  # change every weight, so the test sees our weights, not the source's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_hf_folder(model, tmp_path_factory.mktemp("saved"), src)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.cfg["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
    # ... and our loader reads it back to the same weights
    again = load_llm(out, dtype=torch.float32, decoding_layout=False).model
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_names_round_trip():
    for ours in ["tok_emb.weight", "trf_blocks.11.att.W_query.weight", "trf_blocks.0.ff.fc3.weight",
                 "trf_blocks.2.ff.fc2.7.weight", "trf_blocks.1.att.k_norm.scale", "final_norm.scale"]:
        assert hf_to_ours(ours_to_hf(ours)) == ours
    assert ours_to_hf("trf_blocks.1.norm2.scale", "gemma3_text") == "model.layers.1.pre_feedforward_layernorm.weight"
    with pytest.raises(KeyError):
        ours_to_hf("trf_blocks.0.att.lora.A")
