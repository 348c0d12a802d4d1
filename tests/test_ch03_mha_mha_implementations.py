"""ch03/mha: every multi-head attention variant computes the book's MultiHeadAttention, and the notebook shows it.

The variants of ch03/mha/mha_implementations.py get the reference's weights with `copy_weights` and must give
its outputs and gradients (input and every weight) within float32 rounding, for several shapes, with and without
qkv biases; every one is causal; FlexAttention is checked where this machine can compile it (skipped with the
reason otherwise; its CPU backward is skipped where PyTorch has none). The memory claim is recomputed exactly
(bytes autograd keeps for backward). Then the notebook's stored outputs (quick mode) are read: the equality,
causality and kernel lines it prints must agree. No timing is asserted.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
import torch.nn as nn

from ch03.attention import MultiHeadAttention, PyTorchMultiHeadAttention
from ch03.mha.mha_implementations import (
    MHACombinedQKV,
    MHAEinsum,
    MHAFlexAttention,
    MHAPyTorchClass,
    MHASDPACausal,
    MHASDPAMask,
    MHAWrapper,
    copy_weights,
    flex_attention_status,
    reference_state_dict,
)
from nbexec import REPO

NOTEBOOK = REPO / "ch03" / "mha" / "mha-implementations.ipynb"
RTOL = ATOL = 1e-5  # the notebook's tolerance
VARIANTS = {"MHAWrapper": MHAWrapper, "MHACombinedQKV": MHACombinedQKV, "MHAEinsum": MHAEinsum,
            "MHASDPAMask": MHASDPAMask, "MHASDPACausal": MHASDPACausal, "MHAPyTorchClass": MHAPyTorchClass,
            "MHAPyTorchClass(need_weights=True)": functools.partial(MHAPyTorchClass, need_weights=True),
            "MultiHeadAttention(use_sdpa=True)": MultiHeadAttention}
# (batch, num_tokens, d, num_heads, context_length): a single token, a shorter input than the context, one head
SHAPES = [(2, 6, 8, 2, 6), (3, 17, 32, 4, 20), (1, 1, 16, 4, 8), (2, 9, 12, 1, 9)]


def reference_and_input(shape, qkv_bias: bool, seed: int = 123):
    batch, num_tokens, d, num_heads, context_length = shape
    torch.manual_seed(seed)
    ref = MultiHeadAttention(d, d, context_length, 0.0, num_heads, qkv_bias=qkv_bias, use_sdpa=False)
    return ref, torch.randn(batch, num_tokens, d)


def run(module: nn.Module, x: torch.Tensor, backward: bool = True):
    """Output, input gradient and weight gradients (under the reference's names) of out.sum()."""
    x = x.clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        out = module(x)
    if not backward:
        return out, None, None
    out.sum().backward()
    return out.detach(), x.grad, reference_state_dict(module, grad=True)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_equals_multiheadattention_forward_and_gradients(name, shape, qkv_bias):
    ref, x = reference_and_input(shape, qkv_bias)
    batch, num_tokens, d, num_heads, context_length = shape
    module = copy_weights(ref, VARIANTS[name](d, d, context_length, 0.0, num_heads, qkv_bias=qkv_bias))
    out_ref, grad_ref, weights_ref = run(ref, x)
    out, grad, weights = run(module, x)
    assert out.shape == (batch, num_tokens, d)
    assert_close(out, out_ref)
    assert_close(grad, grad_ref)
    assert weights.keys() == weights_ref.keys()
    for key in weights_ref:
        assert_close(weights[key], weights_ref[key])


def test_chapter3_pytorch_multihead_attention_is_the_same_computation():
    ref, x = reference_and_input((2, 7, 16, 4, 8), qkv_bias=True)
    module = copy_weights(ref, PyTorchMultiHeadAttention(16, 16, 4, 0.0, True, context_length=8))
    out_ref, grad_ref, _ = run(ref, x)
    out, grad, _ = run(module, x)
    assert_close(out, out_ref)
    assert_close(grad, grad_ref)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_are_causal(name):
    ref, x = reference_and_input((2, 10, 16, 4, 10), qkv_bias=True)
    module = copy_weights(ref, VARIANTS[name](16, 16, 10, 0.0, 4, qkv_bias=True))
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 16)
    with torch.no_grad():
        a, b = module(x), module(changed)
    assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_copy_weights_round_trip_and_refusals():
    ref, _ = reference_and_input((1, 4, 12, 3, 4), qkv_bias=True)
    for cls in (MHAWrapper, MHACombinedQKV, MHAEinsum, MHAPyTorchClass):
        back = copy_weights(copy_weights(ref, cls(12, 12, 4, 0.0, 3, qkv_bias=True)),
                            MultiHeadAttention(12, 12, 4, 0.0, 3, qkv_bias=True))
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ValueError, match="biases"):
        copy_weights(ref, MHACombinedQKV(12, 12, 4, 0.0, 3, qkv_bias=False))
    no_bias = copy_weights(MHACombinedQKV(12, 12, 4, 0.0, 3), MHAPyTorchClass(12, 12, 4, 0.0, 3))
    assert no_bias.attn.in_proj_bias is None and no_bias.attn.out_proj.bias is not None


def test_constructor_checks():
    with pytest.raises(ValueError, match="divisible"):
        MHACombinedQKV(10, 10, 4, 0.0, 3)
    with pytest.raises(ValueError, match="divisible"):
        MHAWrapper(10, 10, 4, 0.0, 3)
    with pytest.raises(ValueError, match="d_in == d_out"):
        MHAPyTorchClass(8, 16, 4, 0.0, 2)
    with pytest.raises(ValueError, match="dropout"):
        MHAFlexAttention(8, 8, 4, 0.1, 2)


def test_dropout_is_applied_in_training_only():
    torch.manual_seed(123)
    x = torch.randn(2, 8, 16)
    for cls in (MHAWrapper, MHACombinedQKV, MHAEinsum, MHASDPAMask, MHASDPACausal, MHAPyTorchClass):
        module = cls(16, 16, 8, 0.5, 4)
        with torch.no_grad():
            assert not torch.allclose(module.train()(x), module.eval()(x)), cls.__name__
            assert torch.equal(module.eval()(x), module(x))


def saved_for_backward_bytes(module: nn.Module, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.clone().requires_grad_())
    return sum(storages.values())


def test_sdpa_keeps_no_attention_matrix_for_backward():
    batch, heads, tokens, d = 2, 4, 128, 32
    matrix = batch * heads * tokens * tokens * 4  # one float32 (batch, heads, tokens, tokens) tensor
    x = torch.randn(batch, tokens, d)
    explicit = [MultiHeadAttention(d, d, tokens, 0.0, heads, use_sdpa=False), MHAWrapper(d, d, tokens, 0.0, heads),
                MHACombinedQKV(d, d, tokens, 0.0, heads), MHAEinsum(d, d, tokens, 0.0, heads),
                MHAPyTorchClass(d, d, tokens, 0.0, heads, need_weights=True)]
    fused = [MHASDPACausal(d, d, tokens, 0.0, heads), MHASDPAMask(d, d, tokens, 0.0, heads),
             MultiHeadAttention(d, d, tokens, 0.0, heads), MHAPyTorchClass(d, d, tokens, 0.0, heads)]
    for module in explicit:
        assert saved_for_backward_bytes(module, x) >= matrix, type(module).__name__
    for module in fused:
        assert saved_for_backward_bytes(module, x) < matrix, type(module).__name__


@pytest.fixture(scope="module")
def flex_ok():
    reason = flex_attention_status("cpu")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_flex_attention_equals_multiheadattention(flex_ok, qkv_bias):
    for shape in SHAPES[:2]:
        ref, x = reference_and_input(shape, qkv_bias)
        _, _, d, num_heads, context_length = shape
        module = copy_weights(ref, MHAFlexAttention(d, d, context_length, 0.0, num_heads, qkv_bias=qkv_bias))
        with torch.no_grad():
            assert_close(module(x), ref(x))
        changed = x.clone()
        changed[:, -2:] = 0.0
        with torch.no_grad():
            assert_close(module(changed)[:, :-2], module(x)[:, :-2])


def test_flex_attention_backward(flex_ok):
    reason = flex_attention_status("cpu", backward=True)
    if reason is not None:
        assert "backward" in reason
        pytest.skip(reason)
    ref, x = reference_and_input(SHAPES[1], qkv_bias=True)
    module = copy_weights(ref, MHAFlexAttention(32, 32, 20, 0.0, 4, qkv_bias=True))
    out_ref, grad_ref, _ = run(ref, x)
    out, grad, _ = run(module, x)
    assert_close(out, out_ref)
    assert_close(grad, grad_ref)


def test_flex_attention_status_says_why_not():
    reason = flex_attention_status("cpu")
    assert reason is None or reason.startswith("FlexAttention (compiled forward) does not run")


# --- the notebook's stored outputs -------------------------------------------------------------------------

def cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def output(cell_id: str) -> str:
    found = [c for c in cells() if c.get("id") == cell_id]
    assert len(found) == 1 and found[0]["cell_type"] == "code", cell_id
    return "".join("".join(o.get("text", "")) for o in found[0].get("outputs", []) if o.get("name") == "stdout")


def all_output() -> str:
    return "".join(output(c["id"]) for c in cells() if c["cell_type"] == "code")


def test_notebook_is_stored_from_quick_mode():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["metadata"]["llmfs"]["mode"] == "quick"
    assert "quick mode: True" in output("mha-01")
    ids = [c["id"] for c in cells()]
    assert ids == [f"mha-{i:02d}" for i in range(len(ids))]
    assert "**Stored outputs: quick mode**" in "".join(cells()[0]["source"])


def test_notebook_shows_every_variant_equal():
    text = all_output()
    lines = [line for line in text.splitlines() if "max |out - ref|" in line]
    names = {line.split(" max |out")[0].strip() for line in lines}
    assert {"MHAWrapper", "MHACombinedQKV", "MHAEinsum", "MHASDPAMask", "MHASDPACausal", "MHAPyTorchClass",
            "MHAPyTorchClass(need_weights=True)", "MultiHeadAttention(use_sdpa=True)",
            "PyTorchMultiHeadAttention"} <= names
    assert all(line.endswith(f"rtol={RTOL:g}, atol={ATOL:g}: True") for line in lines), lines
    for line in lines:  # the printed differences are within the printed tolerance
        diffs = [float(v) for v in re.findall(r"= (\d\.\d+e[-+]\d+)", line)]
        assert diffs and all(v <= ATOL * 10 for v in diffs), line
    match = re.search(r"all (\d+) variants equal the reference within rtol=1e-05, atol=1e-05: (\w+)", text)
    assert match and match.group(2) == "True" and int(match.group(1)) == len(lines)
    assert "changing the last 5 tokens leaves the first outputs unchanged: True" in text


def test_notebook_shows_flex_attention_status():
    text = output("mha-21")
    assert text.startswith("FlexAttention, compiled forward: ")
    if "compiled forward: runs here" in text:
        assert re.search(r"MHAFlexAttention .*equal within .*: True", text)
    assert "FlexAttention, backward: " in text


def test_notebook_shows_which_kernels_run():
    text = output("mha-16")
    ops = {line.split("{")[0].strip(): line for line in text.splitlines() if "{" in line}
    assert "'SoftmaxBackward0': 1" in ops["MultiHeadAttention (book)"]
    assert "'SoftmaxBackward0': 4" in ops["MHAWrapper"]  # one per head
    for name in ("MHASDPAMask", "MHASDPACausal"):
        assert "Softmax" not in ops[name] and "Bmm" not in ops[name] and "ScaledDotProduct" in ops[name]
    need = output("mha-19")
    assert re.search(r"need_weights=False: \{[^}]*ScaledDotProduct", need)
    assert re.search(r"need_weights=True: \{[^}]*SoftmaxBackward0", need)
    assert "rows sum to 1: True | zero above the diagonal: True" in need


def test_notebook_measures_and_names_the_machine():
    text = output("mha-26")
    assert "CPU: " in text and "torch " in text and "median of 3 rounds" in text
    assert "less than one attention matrix: True" in text
    for name in ("MultiHeadAttention (book)", "MHAWrapper", "MHASDPACausal", "MHAPyTorchClass"):
        assert re.search(rf"^{re.escape(name)} +\d+\.\d \(", text, re.M), name
