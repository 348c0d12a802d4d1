"""ch05.llama.gemma3 against transformers' Gemma3ForCausalLM (Gemma3TextConfig), on tiny random models.

The tiny models (tests/hf_tiny.py) have a sliding window of 8 tokens, prompts of 50-60 tokens,
two RoPE bases with linear scaling of the global one, and query_pre_attn_scalar != head_dim, so
every Gemma-specific part changes the logits.
"""

import copy
import json
import shutil

import pytest
import torch

from ch05.llama.gemma3 import (
    GEMMA3_CONFIGS,
    Gemma3Model,
    Gemma3Tokenizer,
    GemmaRMSNorm,
    gemma3_config_from_hf,
    gemma3_hf_to_ours,
    load_gemma3,
)
from ch05.llama.llama3 import GroupedQueryAttention, Llama3Model
from ch05.llama.qwen3 import Qwen3Attention
from hf_tiny import check_greedy_text, check_parity, model_dir_fixture, verdict, write_model_dir
from llmfs.errors import UserError

ATOL = 1e-4  # float32 logits; the measured difference is ~1e-7 or 0


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "gemma3_text")


def _prompt_ids(tokenizer, n=50):
    ids = tokenizer.encode(verdict()[:400])[:n]
    assert len(ids) == n
    return torch.tensor([ids, ids[:1] + ids[1:][::-1]])  # a batch of two different sequences, both after <bos>


def test_gemma3_is_built_from_the_llama_and_qwen3_parts(gemma_dir):
    path, _ = gemma_dir
    model = load_gemma3(path)
    assert isinstance(model, Llama3Model)
    att = [b.att for b in model.trf_blocks]
    assert all(isinstance(a, Qwen3Attention) and isinstance(a, GroupedQueryAttention) for a in att)
    assert [a.sliding_window for a in att] == [8, 8, None, 8]  # sliding_window_pattern 3: every third is global
    assert [b.rope_table for b in model.trf_blocks] == ["local", "local", "global", "local"]
    assert isinstance(model.final_norm, GemmaRMSNorm) and isinstance(att[0].q_norm, GemmaRMSNorm)
    assert model.out_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("layers", [None, ["full_attention"] * 3, ["sliding_attention"] * 2 + ["full_attention"]])
def test_logits_match_transformers_with_and_without_cache(layers, gemma_dir, tmp_path):
    """Prompts of 50 tokens, a window of 8: the sliding layers' mask matters in one pass and in the cache."""
    if layers is None:
        path, hf = gemma_dir
    else:
        path = tmp_path / "model"
        hf = write_model_dir(path, "gemma3_text", verdict(), num_hidden_layers=len(layers), layer_types=layers)
    ours = load_gemma3(path)
    assert [b.att.sliding_window is not None for b in ours.trf_blocks] == \
           [t == "sliding_attention" for t in hf.config.layer_types]
    check_parity(ours, hf, _prompt_ids(Gemma3Tokenizer(path)), atol=ATOL)


def test_final_logit_softcapping_when_a_config_asks_for_it(tmp_path):
    """Gemma 3's configs have none (Gemma 2 used 30); a cap of 0.5 squeezes these logits (up to ~0.7) visibly."""
    hf = write_model_dir(tmp_path, "gemma3_text", verdict(), final_logit_softcapping=0.5)
    ours = load_gemma3(tmp_path)
    ids = _prompt_ids(Gemma3Tokenizer(tmp_path))
    check_parity(ours, hf, ids, atol=ATOL)
    with torch.no_grad():
        assert ours(ids).abs().max() < 0.5


def test_greedy_text_matches_transformers_generate(gemma_dir):
    path, hf = gemma_dir
    check_greedy_text(load_gemma3(path), hf, Gemma3Tokenizer(path), verdict()[:300])


@pytest.mark.parametrize("part", ["window", "scale", "local_rope", "embed_scale"])
def test_each_gemma_part_is_needed_for_the_match(part, gemma_dir):
    path, hf = gemma_dir
    ours = load_gemma3(path)
    for block in ours.trf_blocks:
        if part == "window":
            block.att.sliding_window = None
        elif part == "scale":
            block.att.scale = None  # 1 / sqrt(head_dim) instead of 1 / sqrt(query_pre_attn_scalar)
        elif part == "local_rope":
            block.rope_table = "global"
    if part == "embed_scale":
        ours.embed = lambda idx: ours.tok_emb(idx)  # unscaled token vectors
    ids = _prompt_ids(Gemma3Tokenizer(path))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() > 1e-3


def test_bfloat16_load_keeps_bfloat16_and_stays_close(gemma_dir, tmp_path):
    path, hf = gemma_dir
    bf16_dir = tmp_path / "bf16"
    shutil.copytree(path, bf16_dir)
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(bf16_dir)  # a copy: the fixture's model stays float32
    ours = load_gemma3(bf16_dir)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    reference = load_gemma3(path, dtype=torch.bfloat16)  # a float32 folder converted on load
    ids = _prompt_ids(Gemma3Tokenizer(path))
    with torch.no_grad():
        out = ours(ids)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, reference(ids))
        assert (out.float() - hf(ids).logits).abs().max() < 0.05


def test_sharded_folder_loads_the_same_weights(gemma_dir, tmp_path):
    path, hf = gemma_dir
    sharded = tmp_path / "sharded"
    shutil.copytree(path, sharded)
    (sharded / "model.safetensors").unlink()
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ids = _prompt_ids(Gemma3Tokenizer(path))
    with torch.no_grad():
        torch.testing.assert_close(load_gemma3(sharded)(ids), load_gemma3(path)(ids), atol=0, rtol=0)


def test_older_config_keys_read_like_the_new_ones(gemma_dir):
    """transformers 4.x and the Hub's files: rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern."""
    path, _ = gemma_dir
    new = json.loads((path / "config.json").read_text())
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=100_000.0, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               sliding_window_pattern=3)
    assert gemma3_config_from_hf(old) == gemma3_config_from_hf(new)


def test_chat_format_bos_and_stop_tokens(gemma_dir):
    path, _ = gemma_dir
    tok = Gemma3Tokenizer(path)
    assert tok.chat_prompt("Hi") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.chat_prompt("Hi", system="Be brief.") == \
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode("Hi", chat=True)
    assert ids[:2] == [tok.token_id("<bos>"), tok.token_id("<start_of_turn>")] and ids[0] == 2
    assert tok.encode("plain text")[0] == 2  # plain text starts with <bos> too
    assert tok.decode(tok.encode("plain text")) == "plain text"
    assert tok.stop_ids == {tok.token_id("<end_of_turn>"), tok.token_id("<eos>")} == {1, 5}


def test_published_1b_config_has_the_published_size():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = GEMMA3_CONFIGS["1B"]
    with torch.device("meta"):
        ours = Gemma3Model({**cfg, "context_length": 64})
        hf = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32_768))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {gemma3_hf_to_ours(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert [b.att.sliding_window is not None for b in ours.trf_blocks] == \
           [t == "sliding_attention" for t in hf.config.layer_types]
    assert round(sum(p.numel() for p in ours.parameters()) / 1e9, 2) == 1.0  # "1B", the tied embedding counted once


@pytest.mark.parametrize("change, match", [
    (lambda c: {**c, "layer_types": ["full_attention"]}, "layer_types must list"),
    (lambda c: {**c, "sliding_window": "8"}, "sliding_window = '8'"),
    (lambda c: {**c, "hidden_activation": "silu"}, "hidden_activation 'silu'"),
    (lambda c: {**c, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    (lambda c: {**c, "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "'yarn'"),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, r"lacks \['hidden_size'\]"),
    (lambda c: {**c, "model_type": "gemma3"}, "text_config, are not implemented"),
])
def test_a_config_json_that_cannot_describe_gemma3_is_a_one_line_user_error(tmp_path, gemma_dir, change, match):
    folder = tmp_path / "folder"
    shutil.copytree(gemma_dir[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(cfg)))
    with pytest.raises(UserError, match=match) as info:
        load_gemma3(folder)
    assert "\n" not in str(info.value)


def test_the_notebooks_stored_outputs_show_the_matches_it_claims():
    """ch05/llama/gemma3.ipynb: every comparison with transformers printed True, the published sizes are the ones
    Gemma3Model has, and switching off any Gemma part changed the logits."""
    from pathlib import Path

    nb = json.loads((Path(__file__).parents[1] / "ch05/llama/gemma3.ipynb").read_text(encoding="utf-8"))
    text = {c["id"]: "".join("".join(o.get("text", "")) for o in c.get("outputs", [])) for c in nb["cells"]}
    assert nb["metadata"]["llmfs"]["mode"] == "quick" and "quick mode: True" in text["gemma3-01"]
    for cell, claims in (("gemma3-04", 2), ("gemma3-06", 1), ("gemma3-14", 2)):
        assert text[cell].count(": True") == claims and "False" not in text[cell], cell
    assert "logits equal transformers' (atol 1e-5): True True" in text["gemma3-16"]
    assert "same ids with and without the cache: True ; same as transformers: True" in text["gemma3-22"]
    for line in text["gemma3-18"].splitlines():
        assert float(line.rsplit(" ", 1)[1]) > 1e-3, line
    for name, cfg in GEMMA3_CONFIGS.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in Gemma3Model({**cfg, "context_length": 64}).parameters())
        assert f"{n:,}" in next(line for line in text["gemma3-20"].splitlines() if line.startswith(name))
