"""Appendix E: LoRA layers, wrapping a GPT model, freezing, parameter counts and merging."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from appendix_e.lora import (
    LinearWithLoRA,
    LoRALayer,
    add_lora,
    count_trainable_parameters,
    freeze_parameters,
    lora_parameters,
    merge_lora,
    replace_linear_with_lora,
)
from ch04.gpt import GPT_CONFIG_124M, GPTModel

TINY = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


def tiny_classifier(num_classes=2):
    model = GPTModel(TINY)
    model.out_head = nn.Linear(TINY["emb_dim"], num_classes)
    return model.eval()


def lora_count(in_dim, out_dim, rank):
    return rank * (in_dim + out_dim)


def test_lora_layer_init_and_forward():
    layer = LoRALayer(12, 5, rank=3, alpha=2.0)
    assert layer.A.shape == (12, 3) and layer.B.shape == (3, 5)
    assert torch.count_nonzero(layer.B) == 0
    # kaiming_uniform_(a=sqrt(5)) on an (in_dim, rank) tensor draws from U(-1/sqrt(rank), 1/sqrt(rank)).
    assert layer.A.abs().max() <= 1 / math.sqrt(3) and layer.A.std() > 0
    x = torch.randn(4, 7, 12)
    assert torch.equal(layer(x), torch.zeros(4, 7, 5))
    with torch.no_grad():
        layer.B.normal_()
    torch.testing.assert_close(layer(x), 2.0 * (x @ layer.A @ layer.B))  # alpha * x @ A @ B, no / rank
    torch.testing.assert_close(layer.delta_weight(), 2.0 * (layer.A @ layer.B).T)
    with pytest.raises(ValueError, match="rank"):
        LoRALayer(4, 4, rank=0, alpha=1)


def test_b_gets_gradient_at_init_a_does_not():
    layer = LoRALayer(6, 4, rank=2, alpha=1.0)
    (layer(torch.randn(3, 6)) * torch.randn(3, 4)).sum().backward()
    assert torch.count_nonzero(layer.A.grad) == 0  # dL/dA goes through B, which is zero
    assert torch.count_nonzero(layer.B.grad) > 0   # so B moves first, then A


def test_freshly_wrapped_model_matches_base_exactly():
    model = tiny_classifier()
    x = torch.randint(0, TINY["vocab_size"], (3, TINY["context_length"]))
    with torch.no_grad():
        before = model(x)
        replace_linear_with_lora(model, rank=4, alpha=8)
        after = model(x)
    assert torch.equal(before, after)
    wrapped = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(wrapped) == 6 * TINY["n_layers"] + 1  # q, k, v, out_proj, two FF layers per block + head
    plain = [m for m in model.modules() if type(m) is nn.Linear]
    assert {id(m) for m in plain} == {id(w.linear) for w in wrapped}  # every Linear is wrapped


def test_replace_twice_does_not_stack():
    model = tiny_classifier()
    replace_linear_with_lora(model, rank=2, alpha=1)
    n = sum(p.numel() for p in model.parameters())
    replace_linear_with_lora(model, rank=2, alpha=1)
    assert sum(p.numel() for p in model.parameters()) == n


def test_only_lora_parameters_trainable():
    model = tiny_classifier()
    rank, d = 4, TINY["emb_dim"]
    trainable = add_lora(model, rank=rank, alpha=8)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora.A", "lora.B")) for n in names)
    per_block = 4 * lora_count(d, d, rank) + 2 * lora_count(d, 4 * d, rank)
    assert trainable == count_trainable_parameters(model) == TINY["n_layers"] * per_block + lora_count(d, 2, rank)
    assert sum(p.numel() for p in lora_parameters(model)) == trainable
    assert model.trf_blocks[0].att.W_query.linear.weight.requires_grad is False


def test_gpt2_small_classifier_lora_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPTModel({**GPT_CONFIG_124M, "qkv_bias": True})
        model.out_head = nn.Linear(768, 2)
        total_before = sum(p.numel() for p in model.parameters())
        freeze_parameters(model)
        assert count_trainable_parameters(model) == 0
        replace_linear_with_lora(model, rank=16, alpha=16)
    assert total_before == 124_441_346
    assert count_trainable_parameters(model) == 2_666_528


def train_lora_a_little(model, steps=15):
    x = torch.randint(0, TINY["vocab_size"], (8, TINY["context_length"]))
    y = torch.randint(0, 2, (8,))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x)[:, -1, :], y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_lora_training_changes_only_adapters_and_lowers_loss():
    model = tiny_classifier()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=4, alpha=2)
    model, losses = train_lora_a_little(model)
    assert losses[-1] < 0.5 * losses[0]
    for name, value in base_state.items():
        # Base weights now live under `.linear.` inside the wrappers; none of them moved.
        wrapped = name.replace(".weight", ".linear.weight").replace(".bias", ".linear.bias")
        key = name if name in model.state_dict() else wrapped
        assert torch.equal(model.state_dict()[key], value), name


def test_merged_model_matches_lora_model():
    model = tiny_classifier()
    base_keys = set(model.state_dict())
    add_lora(model, rank=4, alpha=2)
    model, _ = train_lora_a_little(model)
    assert all(torch.count_nonzero(m.B) > 0 for m in model.modules() if isinstance(m, LoRALayer))
    x = torch.randint(0, TINY["vocab_size"], (4, TINY["context_length"]))
    with torch.no_grad():
        expected = model(x)
        merged = merge_lora(model)
        got = merged(x)
    assert merged is model
    assert not any(isinstance(m, (LinearWithLoRA, LoRALayer)) for m in merged.modules())
    assert set(merged.state_dict()) == base_keys  # the plain GPT layout again
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert count_trainable_parameters(merged) == 0  # frozen base stays frozen


def test_merge_single_layer_keeps_bias_device_dtype():
    linear = nn.Linear(6, 3).double()
    wrapped = LinearWithLoRA(linear, rank=2, alpha=4)
    assert wrapped.lora.A.dtype == torch.float64
    with torch.no_grad():
        wrapped.lora.B.normal_()
    merged = merge_lora(wrapped)
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float64
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(merged(x), wrapped(x))
    torch.testing.assert_close(merged.weight, linear.weight + 4 * (wrapped.lora.A @ wrapped.lora.B).T)
    assert torch.equal(merged.bias, linear.bias)
    nobias = merge_lora(LinearWithLoRA(nn.Linear(6, 3, bias=False), rank=1, alpha=1))
    assert nobias.bias is None



def test_the_package_root_exports_the_main_names():
    """`from appendix_e import ...` works as with the book's package: the names are lora's objects."""
    import appendix_e
    from appendix_e import LinearWithLoRA, lora

    assert LinearWithLoRA is lora.LinearWithLoRA
    assert {"LinearWithLoRA", "LoRALayer", "replace_linear_with_lora"} <= set(appendix_e.__all__)
    for name in appendix_e.__all__:
        assert getattr(appendix_e, name) is getattr(lora, name), name
