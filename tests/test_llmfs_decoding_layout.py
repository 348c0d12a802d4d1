"""llmfs.decoding_layout: only the weights' strides change; numbers, tying, saving and the commands' use."""

import json

import pytest
import torch
import torch.nn as nn

from ch04.gpt import GPTModel
from ch05.gpt_generate import generate
from llmfs import decoding_layout
from llmfs.checkpoint import save_model
from llmfs.decoding_layout import layout_for_decoding

TINY = {"vocab_size": 60, "context_length": 24, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


def tiny(**overrides) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel({**TINY, **overrides}).eval()


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("tied", [False, True])
def test_only_the_strides_change(tied):
    model, reference = tiny(tie_weights=tied), tiny(tie_weights=tied)
    params_before = {name: p for name, p in model.named_parameters()}
    assert layout_for_decoding(model) is model
    for w in linear_weights(model):
        assert not w.is_contiguous() and w.t().is_contiguous()  # [in, out] in memory, [out, in] in shape
    assert {name: p for name, p in model.named_parameters()} == params_before  # the same Parameter objects
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), name
    if tied:
        assert model.out_head.weight is model.tok_emb.weight
    assert model.pos_emb.weight.is_contiguous()  # embeddings and norms untouched


def test_same_logits_and_greedy_tokens_with_and_without_cache():
    model, reference = layout_for_decoding(tiny(tie_weights=True)), tiny(tie_weights=True)
    idx = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=1e-5)
    for use_cache in (True, False):
        ours = generate(model, idx, 12, TINY["context_length"], use_cache=use_cache)
        assert torch.equal(ours, generate(reference, idx, 12, TINY["context_length"], use_cache=use_cache))


def test_bfloat16_weights_and_the_switch_leave_the_model_alone(monkeypatch):
    model = layout_for_decoding(tiny().to(torch.bfloat16))  # stored order is the faster one for bf16
    assert all(w.is_contiguous() for w in linear_weights(model))
    monkeypatch.setenv("LLMFS_DECODING_LAYOUT", "0")
    model = layout_for_decoding(tiny())
    assert all(w.is_contiguous() for w in linear_weights(model))


def test_a_laid_out_model_saves_loads_and_trains_like_the_original(tmp_path):
    model, reference = layout_for_decoding(tiny()), tiny()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    fresh = GPTModel(TINY)
    fresh.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    for a, b in zip(fresh.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    idx = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    for m in (model, reference):  # one optimizer step each: the same update
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(idx).logsumexp(-1).mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_generation_commands_lay_out_what_they_load(tmp_path, monkeypatch, capsys):
    import ch05.cli
    from ch05.cli import generate_main
    from ch07.cli import load_chat_model

    folder = tmp_path / "pretrained"
    folder.mkdir()
    save_model(tiny(vocab_size=50257), folder / "model.pth")
    (folder / "config.json").write_text(json.dumps({**TINY, "vocab_size": 50257}))
    chat = load_chat_model(folder, device="cpu")
    assert all(w.t().is_contiguous() for w in linear_weights(chat.model))

    laid_out = []
    real = decoding_layout.layout_for_decoding
    monkeypatch.setattr(ch05.cli, "layout_for_decoding", lambda m: laid_out.append(m) or real(m))
    assert generate_main(["--model", str(folder / "model.pth"), "--prompt", "Every effort",
                          "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert len(laid_out) == 1 and all(w.t().is_contiguous() for w in linear_weights(laid_out[0]))


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "llama"])
def test_hugging_face_folders_load_laid_out_and_match_transformers(tmp_path, family):
    from ch05.llama.llama3 import load_llama3
    from ch05.llama.qwen3 import load_qwen3
    from hf_tiny import check_parity, verdict, write_model_dir

    hf = write_model_dir(tmp_path, family, verdict(), tie_word_embeddings=family != "llama")
    load = load_llama3 if family == "llama" else load_qwen3
    model = load(tmp_path, decoding_layout=True)
    weights = linear_weights(model)
    assert weights and all(w.t().is_contiguous() and not w.is_contiguous() for w in weights)
    if family != "llama":
        assert model.out_head.weight is model.tok_emb.weight
    ids = torch.randint(0, model.cfg["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    check_parity(model, hf, ids)
    assert all(w.is_contiguous() for w in linear_weights(load(tmp_path)))  # off unless asked for


def test_a_bfloat16_folder_keeps_its_zero_copy_weights(tmp_path):
    from ch05.llama.qwen3 import load_qwen3
    from hf_tiny import verdict, write_model_dir

    hf = write_model_dir(tmp_path / "fp32", "qwen3", verdict())
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_qwen3(tmp_path / "bf16", decoding_layout=True)
    weights = linear_weights(model)
    assert all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights)
    assert model.out_head.weight is model.tok_emb.weight
