"""Tests for llmfs/onednn_linear.py: float32 CPU linear layers through oneDNN give the same values
and gradients as PyTorch's default path, only where they should, and the trainer uses them."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmfs.onednn_linear as ol
from ch04.gpt import GPTModel
from llmfs.onednn_linear import LinearOneDNN, onednn_linear, onednn_linear_supported
from llmfs.trainer import make_optimizer

needs_onednn = pytest.mark.skipif(not onednn_linear_supported(),
                                  reason="this PyTorch/CPU has no usable oneDNN linear op (not x86, or no oneDNN)")

TINY = {"vocab_size": 300, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": False}  # (a key bias has a ~0 gradient that AdamW would amplify)


def _grad_fn_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_function_matches_f_linear_values_and_gradients(with_bias, frozen_weight):
    x = torch.randn(3, 7, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=not frozen_weight)
    b = torch.randn(40, requires_grad=True) if with_bias else None
    upstream = torch.randn(3, 7, 40)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]

    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, leaves, upstream)
    got = LinearOneDNN.apply(x, w, b)
    got_grads = torch.autograd.grad(got, leaves, upstream)

    assert got.shape == ref.shape == (3, 7, 40)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_context_routes_float32_cpu_linear_layers_and_nothing_else():
    layer = nn.Linear(8, 5)
    x = torch.randn(2, 3, 8)
    assert _grad_fn_name(layer(x)) != "LinearOneDNNBackward"  # outside: PyTorch's default path
    with onednn_linear():
        assert _grad_fn_name(layer(x)) == "LinearOneDNNBackward"  # nn.Linear -> F.linear -> oneDNN
        assert _grad_fn_name(F.linear(input=x, weight=layer.weight)) == "LinearOneDNNBackward"  # keywords too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _grad_fn_name(layer(x)) != "LinearOneDNNBackward"  # autocast keeps its bfloat16 path
        layer_bf16 = nn.Linear(8, 5).to(torch.bfloat16)
        assert _grad_fn_name(layer_bf16(x.to(torch.bfloat16))) != "LinearOneDNNBackward"
        assert _grad_fn_name(x @ layer.weight.t()) != "LinearOneDNNBackward"  # only F.linear is routed
    with onednn_linear(enabled=False):
        assert _grad_fn_name(layer(x)) != "LinearOneDNNBackward"


@needs_onednn
@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
def test_without_autograd_the_op_is_called_directly(no_autograd, onednn_products):
    layer = nn.Linear(8, 5)
    x = torch.randn(2, 3, 8)
    with no_autograd(), onednn_linear():
        got = layer(x)
        got_1d = layer(x[0, 0])  # a single vector, as F.linear allows
    assert len(onednn_products) == 2
    assert got.grad_fn is None and got.shape == (2, 3, 5) and got_1d.shape == (5,)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_1d, got[0, 0], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_min_rows_routes_only_products_of_that_many_rows(onednn_products):
    """`min_rows=2` (the server's batched steps): a single row, however shaped, stays on the default path."""
    layer = nn.Linear(8, 5)
    with torch.no_grad(), onednn_linear(min_rows=2):
        for shape in [(8,), (1, 8), (1, 1, 8)]:
            torch.testing.assert_close(layer(torch.ones(shape)), F.linear(torch.ones(shape), layer.weight, layer.bias))
        assert onednn_products == []
        for shape in [(2, 8), (1, 2, 8), (2, 1, 8)]:
            layer(torch.ones(shape))
        assert len(onednn_products) == 3


@needs_onednn
def test_entered_under_autocast_the_context_is_a_no_op():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not isinstance(onednn_linear(), ol._LinearToOneDNN)
    assert isinstance(onednn_linear(), ol._LinearToOneDNN)


def test_unsupported_cpu_leaves_everything_as_it_is(monkeypatch):
    monkeypatch.setattr(ol.platform, "machine", lambda: "arm64")
    ol.onednn_linear_supported.cache_clear()
    try:
        assert onednn_linear_supported() is False
        layer = nn.Linear(4, 3)
        with onednn_linear():
            assert _grad_fn_name(layer(torch.randn(2, 4))) != "LinearOneDNNBackward"
    finally:
        ol.onednn_linear_supported.cache_clear()


@needs_onednn
def test_gpt_training_steps_match_the_default_path():
    """Three AdamW steps of a small GPT: same losses and weights with and without oneDNN."""

    def train(use_onednn: bool):
        torch.manual_seed(1)
        model = GPTModel(TINY)
        opt = make_optimizer(model, 1e-3, 0.1)
        ids = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(2))
        losses = []
        for _ in range(3):
            with onednn_linear(use_onednn):
                loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, model.state_dict()

    (losses_a, state_a), (losses_b, state_b) = train(True), train(False)
    assert losses_a[-1] < losses_a[0]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for name, value in state_a.items():
        torch.testing.assert_close(value, state_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_autocast_check_works_on_older_pytorch(monkeypatch):
    """PyTorch < 2.4: `is_autocast_enabled` takes no device; the CPU has its own function."""

    def no_device_argument(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", no_device_argument)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: True, raising=False)
    assert ol._cpu_autocast_enabled() is True
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert not ol._routable(x, w, None)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: False, raising=False)
    assert ol._routable(x, w, None)
