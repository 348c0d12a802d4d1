"""Tests for ch03/attention.py: equivalences, causality, the fused/explicit paths and the KV cache."""

import pytest
import torch

from ch03.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    PyTorchMultiHeadAttention,
    SelfAttention_v1,
    SelfAttention_v2,
    causal_mask,
)


def make_mha(d_in=8, d_out=8, context_length=12, dropout=0.0, num_heads=2, qkv_bias=False, use_sdpa=True):
    torch.manual_seed(123)
    return MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=qkv_bias, use_sdpa=use_sdpa)


def paired_mha(**kwargs):
    """An sdpa and an explicit MultiHeadAttention with identical weights, both in eval mode."""
    sdpa = make_mha(use_sdpa=True, **kwargs).eval()
    explicit = make_mha(use_sdpa=False, **kwargs).eval()
    explicit.load_state_dict(sdpa.state_dict())
    return sdpa, explicit


def capture_attn_weights(module):
    """Record the attention weights the explicit path feeds into `module.dropout`."""
    seen = []
    module.dropout.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    return seen


# ---------------------------------------------------------------- single-head classes

def test_self_attention_v1_equals_v2_after_copying_weights():
    x = torch.rand(6, 3)
    v1, v2 = SelfAttention_v1(3, 2), SelfAttention_v2(3, 2)
    assert not torch.allclose(v1(x), v2(x))
    # nn.Linear stores (d_out, d_in) and computes x @ weight.T.
    v1.W_query.data = v2.W_query.weight.T
    v1.W_key.data = v2.W_key.weight.T
    v1.W_value.data = v2.W_value.weight.T
    torch.testing.assert_close(v1(x), v2(x))


def test_self_attention_v2_batched_matches_unbatched():
    sa = SelfAttention_v2(3, 2)
    x = torch.rand(2, 5, 3)
    torch.testing.assert_close(sa(x)[1], sa(x[1]))


def test_causal_mask_is_strict_upper_triangle():
    expected = torch.tensor([[False, True, True], [False, False, True], [False, False, False]])
    assert torch.equal(causal_mask(3), expected)


def test_causal_attention_weights_rows_sum_to_one_and_hide_future():
    ca = CausalAttention(4, 3, context_length=6, dropout=0.0)
    seen = capture_attn_weights(ca)
    ca(torch.rand(2, 5, 4))
    (weights,) = seen
    assert weights.shape == (2, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    assert torch.all(weights.masked_select(causal_mask(5)) == 0)
    assert torch.all(weights[:, 0, 0] == 1)  # the first token can only attend to itself


def test_causal_attention_mask_is_a_non_persistent_buffer():
    ca = CausalAttention(4, 3, context_length=6, dropout=0.0)
    assert "mask" in dict(ca.named_buffers())
    assert "mask" not in ca.state_dict()


def test_causal_attention_too_long_input_raises():
    ca = CausalAttention(4, 3, context_length=4, dropout=0.0)
    with pytest.raises(ValueError, match=r"5 tokens.*context_length=4"):
        ca(torch.rand(1, 5, 4))


# ---------------------------------------------------------------- causality of every causal module

CAUSAL_MODULES = {
    "causal": lambda: CausalAttention(4, 4, 8, 0.0),
    "wrapper": lambda: MultiHeadAttentionWrapper(4, 2, 8, 0.0, num_heads=3),
    "mha_sdpa": lambda: MultiHeadAttention(4, 4, 8, 0.0, num_heads=2, use_sdpa=True),
    "mha_explicit": lambda: MultiHeadAttention(4, 4, 8, 0.0, num_heads=2, use_sdpa=False),
}


@pytest.mark.parametrize("name", CAUSAL_MODULES)
def test_output_at_t_ignores_later_tokens(name):
    module = CAUSAL_MODULES[name]().eval()
    x = torch.rand(2, 7, 4)
    out = module(x)
    for t in range(6):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 5
        out_changed = module(changed)
        torch.testing.assert_close(out_changed[:, :t + 1], out[:, :t + 1])
        assert not torch.allclose(out_changed[:, t + 1:], out[:, t + 1:])


# ---------------------------------------------------------------- multi-head attention

@pytest.mark.parametrize("num_heads,d_out", [(1, 3), (3, 6), (4, 8)])
def test_wrapper_output_dim_is_num_heads_times_d_out(num_heads, d_out):
    wrapper = MultiHeadAttentionWrapper(5, d_out, context_length=6, dropout=0.0, num_heads=num_heads)
    x = torch.rand(2, 6, 5)
    out = wrapper(x)
    assert out.shape == (2, 6, num_heads * d_out)
    torch.testing.assert_close(out, torch.cat([head(x) for head in wrapper.heads], dim=-1))


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("b,num_tokens,d_in,d_out,num_heads", [(1, 1, 3, 2, 1), (2, 6, 3, 2, 2), (3, 5, 16, 12, 4)])
def test_mha_output_shape(use_sdpa, b, num_tokens, d_in, d_out, num_heads):
    mha = MultiHeadAttention(d_in, d_out, context_length=8, dropout=0.1, num_heads=num_heads, use_sdpa=use_sdpa)
    assert mha.head_dim == d_out // num_heads
    assert mha(torch.rand(b, num_tokens, d_in)).shape == (b, num_tokens, d_out)


@pytest.mark.parametrize(
    "b,num_tokens,d_in,d_out,num_heads,qkv_bias",
    [(1, 1, 4, 4, 1, False), (2, 6, 3, 2, 2, False), (3, 12, 16, 12, 4, True), (2, 9, 32, 32, 8, False)],
)
def test_mha_sdpa_and_explicit_agree_in_eval_mode(b, num_tokens, d_in, d_out, num_heads, qkv_bias):
    sdpa, explicit = paired_mha(d_in=d_in, d_out=d_out, num_heads=num_heads, qkv_bias=qkv_bias, dropout=0.3)
    x = torch.randn(b, num_tokens, d_in)
    torch.testing.assert_close(sdpa(x), explicit(x), atol=1e-5, rtol=0)


def test_mha_explicit_attention_weights_rows_sum_to_one_and_hide_future():
    mha = make_mha(use_sdpa=False)
    seen = capture_attn_weights(mha)
    mha(torch.rand(2, 7, 8))
    (weights,) = seen
    assert weights.shape == (2, mha.num_heads, 7, 7)  # (b, num_heads, num_tokens, num_tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, mha.num_heads, 7))
    assert torch.all(weights.masked_select(causal_mask(7)) == 0)


@pytest.mark.parametrize("d_out,num_heads", [(10, 3), (8, 0), (7, 2)])
def test_mha_d_out_not_divisible_by_num_heads_raises(d_out, num_heads):
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(4, d_out, context_length=8, dropout=0.0, num_heads=num_heads)


def test_gpt2_sized_mha_parameter_count():
    mha = MultiHeadAttention(768, 768, context_length=1024, dropout=0.0, num_heads=12, qkv_bias=False)
    assert mha.head_dim == 64
    assert sum(p.numel() for p in mha.parameters()) == 2_360_064
    with_bias = MultiHeadAttention(768, 768, context_length=1024, dropout=0.0, num_heads=12, qkv_bias=True)
    assert sum(p.numel() for p in with_bias.parameters()) == 2_360_064 + 3 * 768


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_mha_dropout_is_active_in_train_mode_only(use_sdpa):
    mha = make_mha(dropout=0.5, use_sdpa=use_sdpa)
    x = torch.rand(2, 6, 8)
    mha.train()
    torch.manual_seed(1)
    first = mha(x)
    second = mha(x)  # different random dropout masks
    assert not torch.allclose(first, second)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x), atol=0, rtol=0)
    # Eval mode equals the same layer built without dropout.
    no_dropout = make_mha(dropout=0.0, use_sdpa=use_sdpa).eval()
    torch.testing.assert_close(mha(x), no_dropout(x))


def test_mha_context_length_exceeded_raises_naming_lengths():
    mha = make_mha(context_length=6)
    with pytest.raises(ValueError, match=r"7 tokens.*context_length=6"):
        mha(torch.rand(1, 7, 8))
    mha(torch.rand(1, 6, 8))  # exactly context_length is fine


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("chunks", [[1] * 6, [3, 2, 1], [6], [2, 4]])
def test_kv_cache_matches_full_forward(use_sdpa, chunks):
    mha = make_mha(use_sdpa=use_sdpa, qkv_bias=True).eval()
    x = torch.randn(2, sum(chunks), 8)
    with torch.no_grad():
        full = mha(x)
        outs, start = [], 0
        for size in chunks:
            outs.append(mha(x[:, start:start + size], use_cache=True))
            start += size
            assert mha.cache_len == start
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_sdpa_and_explicit_agree_step_by_step():
    sdpa, explicit = paired_mha()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        for t in range(5):
            step = x[:, t:t + 1]
            torch.testing.assert_close(sdpa(step, use_cache=True), explicit(step, use_cache=True), atol=1e-5, rtol=0)


def test_kv_cache_context_length_exceeded_raises_and_keeps_cache():
    mha = make_mha(context_length=6).eval()
    with torch.no_grad():
        mha(torch.rand(1, 4, 8), use_cache=True)
        with pytest.raises(ValueError, match=r"7 tokens \(4 cached \+ 3 new\).*context_length=6"):
            mha(torch.rand(1, 3, 8), use_cache=True)
        assert mha.cache_len == 4  # the failed call left the cache alone
        mha(torch.rand(1, 2, 8), use_cache=True)
        assert mha.cache_len == 6
        with pytest.raises(ValueError, match="context_length=6"):
            mha(torch.rand(1, 1, 8), use_cache=True)


def test_reset_cache_starts_a_new_sequence():
    mha = make_mha().eval()
    a, b = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        mha(a, use_cache=True)
        assert mha.cache_len == 4
        mha.reset_cache()
        assert mha.cache_len == 0 and mha.cache_k is None and mha.cache_v is None
        torch.testing.assert_close(mha(b, use_cache=True), mha(b), atol=1e-6, rtol=0)


def test_forward_without_cache_ignores_and_keeps_existing_cache():
    mha = make_mha().eval()
    with torch.no_grad():
        mha(torch.randn(1, 3, 8), use_cache=True)
        x = torch.randn(1, 5, 8)
        fresh = make_mha().eval()
        torch.testing.assert_close(mha(x), fresh(x))
    assert mha.cache_len == 3


# ---------------------------------------------------------------- the book repository's fused variant

def fused_copy(mha: MultiHeadAttention, **kwargs) -> PyTorchMultiHeadAttention:
    """A PyTorchMultiHeadAttention holding `mha`'s weights: Q, K, V rows stacked into one projection."""
    fast = PyTorchMultiHeadAttention(mha.W_query.in_features, mha.d_out, mha.num_heads, **kwargs)
    with torch.no_grad():
        fast.qkv.weight.copy_(torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight]))
        if mha.W_query.bias is not None:
            fast.qkv.bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))
        fast.proj.load_state_dict(mha.out_proj.state_dict())
    return fast.eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 5, 12])
def test_pytorch_mha_equals_mha_with_the_same_weights(qkv_bias, num_tokens):
    explicit = make_mha(d_in=6, d_out=12, num_heads=3, qkv_bias=qkv_bias, use_sdpa=False).eval()
    fast = fused_copy(explicit, qkv_bias=qkv_bias)
    x = torch.randn(2, num_tokens, 6)
    torch.testing.assert_close(fast(x), explicit(x), atol=1e-6, rtol=1e-5)
    # Same number of parameters: one (3*d_out, d_in) matrix instead of three (d_out, d_in) ones.
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in explicit.parameters())


def test_pytorch_mha_is_causal_and_uses_dropout_in_train_mode_only():
    fast = fused_copy(make_mha(), dropout=0.5)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 8)
    torch.testing.assert_close(fast(changed)[:, :4], fast(x)[:, :4])  # later tokens never leak back
    assert torch.equal(fast(x), fast(x))  # eval: no dropout
    fast.train()
    assert not torch.equal(fast(x), fast(x))


def test_pytorch_mha_book_signature_and_errors():
    fast = PyTorchMultiHeadAttention(d_in=4, d_out=8, num_heads=2)  # the book's keywords; dropout 0, no bias
    assert fast.dropout == 0.0 and fast.qkv.bias is None and fast.context_length is None
    assert fast(torch.randn(2, 50, 4)).shape == (2, 50, 8)  # no context_length: any length
    with pytest.raises(ValueError, match="divisible"):
        PyTorchMultiHeadAttention(4, 9, 2)
    limited = PyTorchMultiHeadAttention(4, 8, 2, context_length=3)
    with pytest.raises(ValueError, match="exceeds context_length=3"):
        limited(torch.randn(1, 4, 4))
    limited(torch.randn(1, 2, 4), use_cache=True)
    with pytest.raises(ValueError, match=r"4 tokens \(2 cached \+ 2 new\)"):
        limited(torch.randn(1, 2, 4), use_cache=True)


@pytest.mark.parametrize("chunks", [(6,), (1, 1, 1, 1, 1, 1), (3, 1, 2), (2, 4)])
def test_pytorch_mha_kv_cache_matches_mha(chunks):
    mha = make_mha(d_in=6, d_out=12, num_heads=3, qkv_bias=True).eval()
    fast = fused_copy(mha, qkv_bias=True)
    x = torch.randn(2, sum(chunks), 6)
    start, outs, expected = 0, [], []
    for n in chunks:
        outs.append(fast(x[:, start:start + n], use_cache=True))
        expected.append(mha(x[:, start:start + n], use_cache=True))
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), fast(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs, dim=1), torch.cat(expected, dim=1), atol=1e-6, rtol=1e-5)
    fast.reset_cache()
    assert fast.cache_k is None
    torch.testing.assert_close(fast(x[:, :2], use_cache=True), fast(x[:, :2]))
