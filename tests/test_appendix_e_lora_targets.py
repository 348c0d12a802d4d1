"""appendix_e.lora: `targets` (the --lora-targets option) wraps only the named linear layers, in GPT and the
ch05.llama families (dense and mixture of experts); names parse with clear errors."""

import pytest
import torch

from appendix_e.lora import (
    LinearWithLoRA,
    add_lora,
    merge_lora,
    parse_lora_targets,
    replace_target_linears_with_lora,
)
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.llama.qwen3 import QWEN3_CONFIG_06B, Qwen3Model

SMALL = {"vocab_size": 50, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2}
QWEN = {**QWEN3_CONFIG_06B, **SMALL, "n_kv_groups": 1, "hidden_dim": 24, "head_dim": 8, "dtype": torch.float32}


def _wrapped(model):
    return {n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def test_parse_targets():
    assert parse_lora_targets("q, k,v,q") == ("q", "k", "v")
    assert parse_lora_targets(None) is None and parse_lora_targets("all") is None
    for bad in ("q,query", "", " , "):
        with pytest.raises(ValueError, match="q, k, v, o, gate, up, down, head"):
            parse_lora_targets(bad)


def test_qwen3_targets_pick_layers_by_role():
    model = replace_target_linears_with_lora(Qwen3Model(QWEN), 2, 2, ("q", "o", "gate", "down"))
    assert _wrapped(model) == {f"trf_blocks.{i}.{m}" for i in range(2)
                               for m in ("att.W_query", "att.out_proj", "ff.fc1", "ff.fc3")}
    assert _wrapped(replace_target_linears_with_lora(Qwen3Model(QWEN), 2, 2, ("head",))) == {"out_head"}
    assert len(_wrapped(replace_target_linears_with_lora(Qwen3Model(QWEN), 2, 2))) == 2 * 7 + 1  # None: every layer


def test_moe_experts_are_targets_the_router_is_not():
    cfg = {**QWEN, "num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    model = replace_target_linears_with_lora(Qwen3Model(cfg), 2, 2, ("up",))
    assert _wrapped(model) == {f"trf_blocks.{i}.ff.fc2.{e}" for i in range(2) for e in range(3)}


def test_gpt_targets_and_merge_give_the_same_outputs():
    torch.manual_seed(0)
    model = GPTModel({**GPT_CONFIG_124M, **SMALL, "drop_rate": 0.0}).eval()
    trainable = add_lora(model, 2, 4, ("v", "up", "down"))
    assert _wrapped(model) == {f"trf_blocks.{i}.{m}" for i in range(2)
                               for m in ("att.W_value", "ff.layers.0", "ff.layers.2")}
    assert trainable == sum(2 * (m.linear.in_features + m.linear.out_features)
                            for m in model.modules() if isinstance(m, LinearWithLoRA))
    for m in model.modules():
        if isinstance(m, LinearWithLoRA):
            torch.nn.init.normal_(m.lora.B)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)
    assert not _wrapped(model)
