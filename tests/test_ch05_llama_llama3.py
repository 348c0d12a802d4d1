"""ch05.llama.llama3 against transformers' LlamaForCausalLM (Llama 3 rope scaling), on tiny random models.

The models are saved with save_pretrained into a temp folder with a tokenizer.json trained here,
then loaded by our code from that folder: same logits, same greedy text, with and without the cache.
"""

import json
import shutil
import time

import pytest
import torch

from ch05.llama.llama3 import (
    LLAMA32_CONFIG_1B,
    LLAMA32_CONFIG_3B,
    GroupedQueryAttention,
    Llama3Model,
    Llama3Tokenizer,
    LLMUnavailable,
    RMSNorm,
    compute_rope_params,
    hf_to_ours,
    load_llama3,
    resolve_model_dir,
)
from hf_tiny import check_greedy_text, check_parity, model_dir_fixture, verdict
from llmfs.checkpoint import CheckpointMismatchError
from stalling_server import SILENT, StallingServer, stall_body, trickle, use_hub_endpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "llama")


def _prompt_ids(tokenizer, n=60):
    ids = tokenizer.encode(verdict()[:400])[:n]
    assert len(ids) == n
    return torch.tensor([ids])


def test_rope_tables_match_transformers_llama3_scaling():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=1024,
                         rope_parameters=rope)
    pos = torch.arange(1024)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = compute_rope_params(64, 500000.0, 1024, LLAMA32_CONFIG_1B["rope_freq"])
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-5, rtol=0)
    plain_cos, _ = compute_rope_params(64, 500000.0, 1024)
    assert (plain_cos - cos).abs().max() > 0.1  # the scaling changes the low frequencies


def test_rmsnorm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(2, 5, 16)
    ours, ref = RMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.scale.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.scale)
    torch.testing.assert_close(ours(x), ref(x))


def test_logits_match_transformers_with_and_without_cache(llama_dir):
    path, hf = llama_dir
    ours = load_llama3(path)
    assert ours.cfg["rope_freq"]["original_context_length"] == 32
    ids = _prompt_ids(Llama3Tokenizer(path))  # 60 tokens: past the 32-token "original" context
    check_parity(ours, hf, ids)


def test_greedy_text_matches_transformers_generate(llama_dir):
    path, hf = llama_dir
    tok = Llama3Tokenizer(path)
    check_greedy_text(load_llama3(path), hf, tok, verdict()[:200])


def test_rope_scaling_is_what_makes_the_match(llama_dir):
    path, hf = llama_dir
    ours = load_llama3(path)
    ours.cfg.pop("rope_freq")
    ours.init_rope()
    ids = _prompt_ids(Llama3Tokenizer(path))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() > 1e-3


def test_tied_embedding_is_one_parameter_and_nothing_is_left_on_meta(llama_dir):
    path, hf = llama_dir
    ours = load_llama3(path)
    assert ours.out_head.weight is ours.tok_emb.weight
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert all(b.device.type == "cpu" for b in ours.buffers())
    assert sum(p.numel() for p in ours.parameters()) == hf.num_parameters()
    assert ours.cos.shape == (128, 16)


def test_sharded_checkpoint_with_index_loads_the_same(tmp_path, llama_dir):
    path, hf = llama_dir
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="60KB")
    shutil.copy(path / "tokenizer.json", sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = load_llama3(path), load_llama3(sharded)
    ids = _prompt_ids(Llama3Tokenizer(path), 20)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_bfloat16_loading_keeps_every_weight_in_bf16_and_close_to_fp32(llama_dir):
    path, _ = llama_dir
    fp32, bf16 = load_llama3(path), load_llama3(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.out_head.weight is bf16.tok_emb.weight
    ids = _prompt_ids(Llama3Tokenizer(path), 20)
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_kv_cache_holds_only_the_key_value_heads():
    att = GroupedQueryAttention(d_in=32, num_heads=8, num_kv_groups=2)
    cos, sin = compute_rope_params(4, context_length=16)
    att(torch.randn(1, 5, 32), cos[:5], sin[:5], use_cache=True)
    assert att.cache_k.shape == (1, 2, 5, 4)  # (b, n_kv_groups, tokens, head_dim): 4x less than 8 heads
    assert att.W_key.weight.shape == (8, 32)


def test_published_configs_have_the_published_sizes():
    from transformers import LlamaConfig, LlamaForCausalLM

    for cfg, hf_kwargs in ((LLAMA32_CONFIG_1B, {"hidden_size": 2048, "num_attention_heads": 32,
                                                 "num_hidden_layers": 16}),
                           (LLAMA32_CONFIG_3B, {"hidden_size": 3072, "num_attention_heads": 24,
                                                 "num_hidden_layers": 28})):
        with torch.device("meta"):
            ours = Llama3Model({**cfg, "context_length": 64})
            hf = LlamaForCausalLM(LlamaConfig(vocab_size=128256, intermediate_size=8192, num_key_value_heads=8,
                                              tie_word_embeddings=True, **hf_kwargs))
        shapes = {hf_to_ours(k): tuple(v.shape) for k, v in hf.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes


def test_chat_format_uses_single_header_tokens(llama_dir):
    path, _ = llama_dir
    tok = Llama3Tokenizer(path)
    ids = tok.encode("Hello there", chat=True, system="Be brief.")
    special = {t: tok.token_id(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                           "<|eot_id|>")}
    assert ids[0] == special["<|begin_of_text|>"]
    assert ids.count(special["<|start_header_id|>"]) == 3  # system, user, assistant
    assert ids.count(special["<|eot_id|>"]) == 2  # the assistant's turn is left open
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|end_header_id|>\n\n")
    assert tok.stop_ids == {special["<|eot_id|>"], tok.token_id("<|end_of_text|>")}
    assert tok.encode("Hello")[0] == special["<|begin_of_text|>"]  # plain text starts with begin-of-text


def test_shape_mismatch_names_the_tensor(tmp_path, llama_dir):
    path, _ = llama_dir
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(CheckpointMismatchError, match=r"trf_blocks\.0\.ff\.fc1\.weight: file \(96, 64\) vs model "
                                                      r"\(80, 64\)"):
        load_llama3(bad)


def test_bad_inputs_give_clear_errors(tmp_path, llama_dir):
    path, _ = llama_dir
    ours = load_llama3(path)
    with pytest.raises(ValueError, match="exceeds the model's context_length 128"):
        ours(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        Llama3Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llama3(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model folder"):
        resolve_model_dir(tmp_path / "nowhere")
    rope = json.loads((path / "config.json").read_text())
    rope["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    odd = tmp_path / "odd"
    shutil.copytree(path, odd)
    (odd / "config.json").write_text(json.dumps(rope))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        load_llama3(odd)
    with pytest.raises(KeyError, match="n_kv_groups"):
        Llama3Model({k: v for k, v in LLAMA32_CONFIG_1B.items() if k != "n_kv_groups"})


def test_hub_id_offline_gives_the_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LLMUnavailable, match="not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 is set") \
            as info:
        resolve_model_dir("meta-llama/Llama-3.2-1B", cache_dir=tmp_path)
    assert "\n" not in str(info.value) and "huggingface-cli login" in str(info.value)


@pytest.mark.parametrize("listing, says", [
    (SILENT, "did not answer within 1 s"),
    (stall_body(5000, b'{"id": "meta-llama/'), "stopped sending data for 1 s"),
    (trickle(b'{"id": "meta-llama/Llama-3.2-1B", "siblings": []}' * 8, pieces=10, interval=0.4),
     "did not finish its answer within 1 s"),
], ids=["never-answers", "stalls-the-body", "trickles"])
def test_a_hub_listing_that_never_comes_is_given_up_on_after_the_wait(tmp_path, monkeypatch, listing, says):
    """The listing request had no timeout at all: one endpoint kept a user waiting for over 400 s."""
    import llmfs.download

    monkeypatch.setattr(llmfs.download, "NETWORK_WAIT_S", 1.0)
    with StallingServer([("GET", "/api/models/", listing)]) as server:
        use_hub_endpoint(monkeypatch, server.url, tmp_path)
        start = time.monotonic()
        with pytest.raises(LLMUnavailable) as info:
            resolve_model_dir("meta-llama/Llama-3.2-1B", cache_dir=tmp_path / "cache")
        assert time.monotonic() - start < 5
    assert f"not in the local Hugging Face cache, and {server.url} (HF_ENDPOINT) {says}" in str(info.value)
    assert ("GET", "/api/models/meta-llama/Llama-3.2-1B/revision/main") in server.requests


# --- a folder that does not hold such a model: one line (a UserError), never a KeyError or TypeError ---

def _folder_with_config(tmp_path, source, change=None, text=None):
    folder = tmp_path / "folder"
    shutil.copytree(source, folder)
    cfg = json.loads((source / "config.json").read_text())
    if change is not None:
        cfg = change(cfg)
    (folder / "config.json").write_text(text if text is not None else json.dumps(cfg))
    return folder


def _without(*keys):
    return lambda cfg: {k: v for k, v in cfg.items() if k not in keys}


@pytest.mark.parametrize("change, text, match", [
    (None, "{not json", "is not valid JSON"),
    (None, "[1, 2]", "holds a list, not a model config"),
    (_without("hidden_size"), None, r"lacks \['hidden_size'\]"),
    (lambda c: {**c, "num_attention_heads": "4"}, None, "num_attention_heads = '4' is not a whole number"),
    (lambda c: {**c, "num_hidden_layers": 0}, None, "num_hidden_layers = 0 is not a whole number"),
    (lambda c: {**c, "num_key_value_heads": 3}, None, "must be a multiple of n_kv_groups"),
    (lambda c: {**c, "hidden_act": "gelu"}, None, "hidden_act 'gelu'"),
    (lambda c: {**c, "rope_theta": "big", "rope_parameters": None}, None, "rope_theta 'big' is not a number"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, None, "rope scaling lacks"),
    (lambda c: {**c, "model_type": "mistral"}, None, "describes a 'mistral' model"),
])
def test_a_config_json_that_cannot_describe_the_model_is_a_user_error(tmp_path, llama_dir, change, text, match):
    from llmfs.errors import UserError

    folder = _folder_with_config(tmp_path, llama_dir[0], change, text)
    with pytest.raises(UserError, match=match):
        load_llama3(folder)


def test_damaged_weight_files_are_a_user_error(tmp_path, llama_dir):
    from llmfs.checkpoint import CheckpointFileError

    folder = _folder_with_config(tmp_path, llama_dir[0])
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointFileError, match="model.safetensors is not a readable .safetensors file"):
        load_llama3(folder)
    weights.unlink()
    (folder / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(CheckpointFileError, match="not a safetensors index"):
        load_llama3(folder)
