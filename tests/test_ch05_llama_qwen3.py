"""ch05.llama.qwen3 against transformers' Qwen3ForCausalLM and Qwen3MoeForCausalLM, on tiny random models."""

import json
import shutil

import pytest
import torch

from ch05.llama.llama3 import GroupedQueryAttention, Llama3Model, hf_to_ours
from ch05.llama.qwen3 import (
    QWEN3_CONFIGS,
    MoEFeedForward,
    Qwen3Attention,
    Qwen3Model,
    Qwen3Tokenizer,
    load_qwen3,
)
from hf_tiny import check_greedy_text, check_parity, model_dir_fixture, verdict


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "qwen3")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "qwen3_moe")


def _prompt_ids(tokenizer, n=50):
    ids = tokenizer.encode(verdict()[:400])[:n]
    assert len(ids) == n
    return torch.tensor([ids, ids[::-1]])  # a batch of two different sequences


def test_qwen3_is_built_from_the_llama_parts(qwen_dir):
    path, _ = qwen_dir
    model = load_qwen3(path)
    assert isinstance(model, Llama3Model)
    assert isinstance(model.trf_blocks[0].att, GroupedQueryAttention)
    assert isinstance(model.trf_blocks[0].att, Qwen3Attention)
    assert model.trf_blocks[0].att.head_dim == 32  # set on its own: 4 heads x 32 != emb_dim 64
    assert model.out_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("fixture", ["qwen_dir", "moe_dir"])
def test_logits_match_transformers_with_and_without_cache(fixture, request):
    path, hf = request.getfixturevalue(fixture)
    check_parity(load_qwen3(path), hf, _prompt_ids(Qwen3Tokenizer(path)))


@pytest.mark.parametrize("fixture", ["qwen_dir", "moe_dir"])
def test_greedy_text_matches_transformers_generate(fixture, request):
    path, hf = request.getfixturevalue(fixture)
    check_greedy_text(load_qwen3(path), hf, Qwen3Tokenizer(path), verdict()[:200])


def test_qk_norm_is_what_makes_the_match(qwen_dir):
    path, hf = qwen_dir
    ours = load_qwen3(path)
    for block in ours.trf_blocks:
        block.att.normalize_qk = lambda q, k: (q, k)  # Llama's attention
    ids = _prompt_ids(Qwen3Tokenizer(path))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() > 1e-3


def test_moe_runs_only_the_chosen_experts(moe_dir):
    path, _ = moe_dir
    model = load_qwen3(path)
    ff = model.trf_blocks[0].ff
    assert isinstance(ff, MoEFeedForward) and len(ff.fc1) == 6
    used = []
    for e, layer in enumerate(ff.fc1):
        layer.register_forward_hook(lambda mod, inp, out, e=e: used.append((e, inp[0].shape[0])))
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        chosen = ff.gate(x[0]).topk(2, dim=-1).indices[0].tolist()
        ff(x)
    assert sorted(e for e, _ in used) == sorted(chosen)  # one token: exactly its 2 experts run
    used.clear()
    with torch.no_grad():
        ff(torch.randn(1, 40, 64))
    assert sum(n for _, n in used) == 40 * 2  # every token goes to exactly 2 experts


def test_published_configs_have_the_published_sizes():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = QWEN3_CONFIGS["0.6B"]
    with torch.device("meta"):
        ours = Qwen3Model({**cfg, "context_length": 64})
        hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                          num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                          head_dim=128, tie_word_embeddings=True))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {hf_to_ours(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    # The model cards' parameter counts (a tied embedding counted once).
    for name, billions in (("0.6B", 0.6), ("1.7B", 1.7), ("4B", 4.0), ("8B", 8.2), ("14B", 14.8), ("32B", 32.8)):
        with torch.device("meta"):
            model = Qwen3Model({**QWEN3_CONFIGS[name], "context_length": 64})
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 1) == billions, name
    moe = QWEN3_CONFIGS["30B-A3B"]
    per_expert = 3 * moe["emb_dim"] * moe["moe_intermediate_size"]
    assert 28e9 < moe["n_layers"] * moe["num_experts"] * per_expert < 30e9  # the experts hold most of "30B"


def test_chat_template_with_and_without_thinking(qwen_dir):
    path, _ = qwen_dir
    tok = Qwen3Tokenizer(path)
    assert tok.chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.chat_prompt("Hi", thinking=True).endswith("<|im_start|>assistant\n")
    assert tok.chat_prompt("Hi", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = tok.encode("Hi", chat=True)
    assert ids[0] == tok.token_id("<|im_start|>") and tok.token_id("<think>") in ids
    assert tok.stop_ids == {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")}
    assert tok.decode(tok.encode("plain text")) == "plain text"  # no begin-of-text token in Qwen3


def test_mixed_dense_and_moe_blocks_are_refused(tmp_path, moe_dir):
    path, _ = moe_dir
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [0]}))
    with pytest.raises(ValueError, match="mixes dense and MoE blocks"):
        load_qwen3(bad)
    with pytest.raises(ValueError, match="not 'qwen3' or 'qwen3_moe'"):
        load_qwen3(_llama_like(tmp_path, path))


def _llama_like(tmp_path, path):
    other = tmp_path / "llama_like"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return other


@pytest.mark.parametrize("change, match", [
    (lambda c: {**c, "use_sliding_window": True}, "sliding-window attention"),
    (lambda c: {k: v for k, v in c.items() if k != "moe_intermediate_size"}, r"lacks \['moe_intermediate_size'\]"),
    (lambda c: {**c, "num_experts_per_tok": "2"}, "num_experts_per_tok = '2', not a whole number"),
    (lambda c: {**c, "model_type": "llama"}, "describes a 'llama' model"),
])
def test_a_config_json_that_cannot_describe_qwen3_is_a_user_error(tmp_path, moe_dir, change, match):
    from llmfs.errors import UserError

    folder = tmp_path / "folder"
    shutil.copytree(moe_dir[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(cfg)))
    with pytest.raises(UserError, match=match):
        load_qwen3(folder)
