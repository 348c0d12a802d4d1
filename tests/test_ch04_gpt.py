"""Tests for ch04/gpt.py: size facts of GPT-2, the building blocks, input checks,
generation, the attention back-ends, the KV cache and a short training run.

Size facts use the meta device (shapes only, no memory, no random init), so
building the 124M and 355M models costs milliseconds. Everything else uses a
tiny config.
"""

import math

import pytest
import torch
import torch.nn as nn

from ch03.attention import MultiHeadAttention
from ch04.gpt import (
    GELU,
    GPT2_SIZES,
    GPT_CONFIG_124M,
    FeedForward,
    GPTModel,
    GPTModelFast,
    LayerNorm,
    TransformerBlock,
    count_parameters,
    gelu_formula,
    generate_text_simple,
    model_size_mb,
)

TINY = {
    "vocab_size": 100,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": False,
}


def meta_model(cfg: dict) -> GPTModel:
    with torch.device("meta"):
        return GPTModel(cfg)


def tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel({**TINY, **overrides}).eval()


# ---------------------------------------------------------------- size facts


def test_gpt2_124m_parameter_count_and_memory():
    model = meta_model(GPT_CONFIG_124M)
    assert model.tok_emb.weight.is_meta  # really no memory was allocated
    total = count_parameters(model)
    assert total == 163_009_536
    assert total - model.out_head.weight.numel() == 124_412_160
    assert model_size_mb(model) == pytest.approx(621.83, abs=0.005)
    assert model_size_mb(model, torch.bfloat16) == pytest.approx(621.83 / 2, abs=0.005)


def test_gpt2_medium_parameter_count():
    model = meta_model({**GPT_CONFIG_124M, **GPT2_SIZES["gpt2-medium"]})
    assert count_parameters(model) == 406_212_608


def test_meta_count_matches_real_model():
    """count_parameters on meta tensors gives the same number as on real ones."""
    cfg = {**TINY, "n_layers": 3}
    assert count_parameters(meta_model(cfg)) == count_parameters(GPTModel(cfg))


def test_feedforward_vs_attention_parameters_per_block():
    block = meta_model(GPT_CONFIG_124M).trf_blocks[0]
    assert count_parameters(block.ff) == 4_722_432
    assert count_parameters(block.att) == 2_360_064


# ---------------------------------------------------------------- weight tying


def test_tie_weights_shares_one_parameter():
    model = tiny_model()
    untied = count_parameters(model)
    model.tie_weights()
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert count_parameters(model) == untied - TINY["vocab_size"] * TINY["emb_dim"]
    names = [n for n, _ in model.named_parameters()]
    assert "out_head.weight" not in names  # listed once, under its first owner

    # Gradients from both uses (lookup and output projection) land in one tensor.
    ids = torch.tensor([[1, 2, 3]])
    model(ids).sum().backward()
    grad = model.tok_emb.weight.grad
    assert grad is not None and model.out_head.weight.grad is grad
    # Rows never looked up still get a gradient, through the output head.
    assert grad[50].abs().sum() > 0


def test_tie_weights_config_key_and_survives_to():
    model = tiny_model(tie_weights=True)
    assert model.out_head.weight is model.tok_emb.weight
    model.to(torch.float64)
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.dtype == torch.float64


# ---------------------------------------------------------------- building blocks


def test_layernorm_normalises_each_row_and_matches_formula():
    x = torch.randn(2, 5) * 3 + 7
    ln = LayerNorm(5)
    out = ln(x)
    torch.testing.assert_close(out.mean(dim=-1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=-1, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)

    with torch.no_grad():
        ln.scale.copy_(torch.randn(5))
        ln.shift.copy_(torch.randn(5))
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    manual = (x - mean) / torch.sqrt(var + ln.eps) * ln.scale + ln.shift
    torch.testing.assert_close(ln(x), manual)


def test_gelu_matches_formula():
    x = torch.linspace(-6, 6, 201)
    torch.testing.assert_close(GELU()(x), gelu_formula(x))
    assert GELU()(torch.tensor(0.0)) == 0
    assert GELU()(torch.tensor(-1.0)) < 0  # unlike ReLU, small negative outputs


def test_feedforward_and_block_keep_shape():
    x = torch.randn(2, 4, TINY["emb_dim"])
    assert FeedForward(TINY)(x).shape == x.shape
    assert TransformerBlock(TINY)(x).shape == x.shape


def test_separate_dropout_rates():
    cfg = {**TINY, "drop_rate": 0.1, "drop_rate_emb": 0.2, "drop_rate_attn": 0.3, "drop_rate_shortcut": 0.4}
    model = GPTModel(cfg)
    assert model.drop_emb.p == 0.2
    for block in model.trf_blocks:
        assert block.att.dropout.p == 0.3
        assert block.drop_shortcut.p == 0.4
    plain = GPTModel({**TINY, "drop_rate": 0.1})
    assert plain.drop_emb.p == plain.trf_blocks[0].att.dropout.p == plain.trf_blocks[0].drop_shortcut.p == 0.1


# ---------------------------------------------------------------- the model


def test_output_shape():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (3, 7))
    assert model(ids).shape == (3, 7, TINY["vocab_size"])


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (1, 10))
    changed = ids.clone()
    t = 6
    changed[0, t] = (ids[0, t] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


def test_too_long_sequence_names_both_lengths():
    model = tiny_model()
    ids = torch.zeros(1, TINY["context_length"] + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"17.*16"):
        model(ids)


@pytest.mark.parametrize("bad", [-1, TINY["vocab_size"]])
def test_out_of_range_token_id_is_named(bad):
    model = tiny_model()
    ids = torch.tensor([[1, bad, 2]])
    with pytest.raises(ValueError, match=rf"token id {bad}\b"):
        model(ids)


def test_missing_config_key_is_named():
    cfg = {k: v for k, v in TINY.items() if k != "n_heads"}
    with pytest.raises(KeyError, match="n_heads"):
        GPTModel(cfg)


def test_emb_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        GPTModel({**TINY, "n_heads": 3})
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(d_in=8, d_out=10, context_length=4, dropout=0.0, num_heads=4)


# ---------------------------------------------------------------- generation


class RecordingModel(nn.Module):
    """Wraps a model and records the length of every input it sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.lengths: list[int] = []

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        return self.model(idx)


def test_generate_appends_and_crops_context():
    model = tiny_model()
    rec = RecordingModel(model)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 3))
    out = generate_text_simple(rec, prompt, max_new_tokens=6, context_size=5)
    assert out.shape == (2, 9)
    assert torch.equal(out[:, :3], prompt)
    assert rec.lengths == [3, 4, 5, 5, 5, 5]

    # Each new token is the argmax over the last position of the cropped context.
    with torch.no_grad():
        for step in range(6):
            ctx = out[:, : 3 + step][:, -5:]
            expected = model(ctx)[:, -1].argmax(dim=-1)
            assert torch.equal(out[:, 3 + step], expected)


def test_generate_beyond_context_length():
    model = tiny_model()
    prompt = torch.randint(0, TINY["vocab_size"], (1, TINY["context_length"]))
    out = generate_text_simple(model, prompt, max_new_tokens=4, context_size=TINY["context_length"])
    assert out.shape == (1, TINY["context_length"] + 4)


def test_sdpa_and_explicit_attention_agree():
    fused = tiny_model(use_sdpa=True)
    explicit = tiny_model(use_sdpa=False)
    explicit.load_state_dict(fused.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), explicit(ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_kv_cache_matches_full_forward(use_sdpa):
    model = tiny_model(use_sdpa=use_sdpa)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        full = model(ids)
        model.reset_kv_cache()
        # A 3-token prefill, then one token at a time.
        steps = [model(ids[:, :3], use_cache=True)]
        steps += [model(ids[:, t : t + 1], use_cache=True) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert model.current_pos == 10

    # The cache respects the context length, and reset starts over.
    with torch.no_grad():
        model(ids[:, :6], use_cache=True)  # 10 + 6 = 16 fits
        with pytest.raises(ValueError, match="context_length"):
            model(ids[:, :1], use_cache=True)
        model.reset_kv_cache()
        torch.testing.assert_close(model(ids[:, :4], use_cache=True), full[:, :4], atol=1e-5, rtol=1e-4)


def test_replaced_output_head_is_used_as_is_when_decoding():
    model = tiny_model()
    model.out_head = nn.Sequential(nn.Linear(TINY["emb_dim"], 3))  # e.g. a classifier head
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        model.reset_kv_cache()
        model(ids[:, :4], use_cache=True)
        last = model(ids[:, 4:], use_cache=True)
    assert last.shape == (1, 1, 3)
    torch.testing.assert_close(last, model(ids)[:, 4:], atol=1e-5, rtol=1e-4)

# ---------------------------------------------------------------- training


def test_model_learns_a_repeated_batch():
    model = tiny_model()
    model.train()
    data = torch.randint(0, TINY["vocab_size"], (4, TINY["context_length"] + 1))
    inputs, targets = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    losses = []
    for _ in range(50):
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(TINY["vocab_size"]), abs=0.5)  # near-uniform start
    assert losses[-1] < 0.3 * losses[0]


def test_cached_decoding_under_bfloat16_autocast():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.reset_kv_cache()
        model(ids[:, :4], use_cache=True)
        last = model(ids[:, 4:], use_cache=True)
        full = model(ids)
    assert last.dtype == torch.bfloat16
    torch.testing.assert_close(last, full[:, 4:], atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- GPTModelFast (the book repository's bonus)

def fast_state_from(model: GPTModel) -> dict:
    """GPTModel weights renamed for GPTModelFast: Q/K/V stacked into att.qkv, out_proj as att.proj."""
    state = {}
    for key, value in model.state_dict().items():
        prefix, _, rest = key.partition(".att.")
        if not rest:
            state[key] = value
        elif rest.startswith("W_query."):
            kind = rest.split(".")[1]  # weight or bias
            parts = [model.state_dict()[f"{prefix}.att.{w}.{kind}"] for w in ("W_query", "W_key", "W_value")]
            state[f"{prefix}.att.qkv.{kind}"] = torch.cat(parts)
        elif rest.startswith("out_proj."):
            state[f"{prefix}.att.proj.{rest.split('.')[1]}"] = value
    return state


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_gpt_model_fast_equals_gpt_model_with_the_same_weights(qkv_bias):
    model = tiny_model(qkv_bias=qkv_bias, use_sdpa=False)  # the chapter's explicit attention math
    fast = GPTModelFast({**TINY, "qkv_bias": qkv_bias}).eval()
    assert count_parameters(fast) == count_parameters(model)
    fast.load_state_dict(fast_state_from(model))  # strict: every name accounted for
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["context_length"]))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), atol=1e-5, rtol=1e-5)
    out = generate_text_simple(fast, idx[:1, :3], max_new_tokens=20, context_size=TINY["context_length"])
    assert torch.equal(out, generate_text_simple(model, idx[:1, :3], 20, TINY["context_length"]))


@pytest.mark.parametrize("tie", [False, True])
def test_gpt_model_fast_draws_the_book_weights_under_a_seed(tie):
    """The book's GPTModelFast draws GPTModel's numbers in GPTModel's order: Q/K/V stacked."""
    cfg = {**TINY, "tie_weights": tie}
    torch.manual_seed(123)
    model = GPTModel(cfg)
    after_model = torch.rand(3)
    torch.manual_seed(123)
    fast = GPTModelFast(cfg)
    assert torch.equal(torch.rand(3), after_model), "GPTModelFast draws more random numbers than the book's"
    assert set(fast.state_dict()) == set(fast_state_from(model))
    for key, value in fast_state_from(model).items():
        assert torch.equal(fast.state_dict()[key], value), key
    assert (fast.out_head.weight is fast.tok_emb.weight) == tie


def test_gpt_model_fast_trains_and_generates_with_the_kv_cache():
    torch.manual_seed(123)
    fast = GPTModelFast({**TINY, "drop_rate": 0.1})
    assert all(type(block.att).__name__ == "PyTorchMultiHeadAttention" for block in fast.trf_blocks)
    idx = torch.randint(0, TINY["vocab_size"], (2, 8))
    loss = nn.functional.cross_entropy(fast(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None for p in fast.parameters())

    fast.eval()
    with torch.no_grad():
        full = fast(idx)
        fast.reset_kv_cache()
        steps = [fast(idx[:, :5], use_cache=True)] + [fast(idx[:, i:i + 1], use_cache=True) for i in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert fast.current_pos == 8
    fast.reset_kv_cache()
    assert fast.current_pos == 0 and all(block.att.cache_k is None for block in fast.trf_blocks)
