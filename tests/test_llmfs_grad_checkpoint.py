"""llmfs.grad_checkpoint: the same loss and gradients with and without gradient checkpointing, for chapter 4's
GPTModel (dropout on: the random state is replayed) and the ch05.llama families (with LoRA adapters too)."""

import torch

from appendix_e.lora import add_lora
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.gpt_train import calc_loss_batch
from ch05.llama.gemma3 import GEMMA3_CONFIG_1B, Gemma3Model
from ch05.llama.qwen3 import QWEN3_CONFIG_06B, Qwen3Model
from llmfs.grad_checkpoint import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    is_gradient_checkpointing,
)

SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 3}


def _loss_and_grads(model, ids, targets, seed=5):
    """(loss, gradients, number of tensors the forward pass kept for the backward pass)."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both runs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        loss = calc_loss_batch(ids, targets, model, "cpu")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(saved)


def _check_same(model):
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    targets[:, :5] = -100
    loss, grads, kept = _loss_and_grads(model, ids, targets)
    names = list(model.state_dict())
    enable_gradient_checkpointing(model)
    enable_gradient_checkpointing(model)  # twice is once
    assert is_gradient_checkpointing(model) and list(model.state_dict()) == names  # no new names
    loss_ckpt, grads_ckpt, kept_ckpt = _loss_and_grads(model, ids, targets)
    assert kept_ckpt < kept / 2  # what the forward pass keeps for the backward pass shrinks
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # evaluation and generation are untouched
    with torch.no_grad():
        model.eval()
        out = model(ids)
    disable_gradient_checkpointing(model)
    assert not is_gradient_checkpointing(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), out)


def test_gpt_with_dropout_same_loss_and_gradients():
    torch.manual_seed(0)
    _check_same(GPTModel({**GPT_CONFIG_124M, **SMALL, "drop_rate": 0.2}))


def test_qwen3_same_loss_and_gradients_also_with_lora():
    cfg = {**QWEN3_CONFIG_06B, **SMALL, "n_kv_groups": 2, "hidden_dim": 48, "head_dim": 8, "dtype": torch.float32}
    torch.manual_seed(0)
    _check_same(Qwen3Model(cfg))
    torch.manual_seed(0)
    model = Qwen3Model(cfg)
    add_lora(model, rank=2, alpha=4)
    for p in model.parameters():  # give B non-zero values, so every adapter's gradient matters
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    _check_same(model)


def test_gemma3_same_loss_and_gradients():
    cfg = {**GEMMA3_CONFIG_1B, **SMALL, "n_kv_groups": 1, "hidden_dim": 48, "head_dim": 8, "dtype": torch.float32,
           "sliding_window": 4, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
           "query_pre_attn_scalar": 8}
    torch.manual_seed(0)
    _check_same(Gemma3Model(cfg))


def test_recomputation_happens_only_when_training_with_gradients():
    torch.manual_seed(0)
    model = enable_gradient_checkpointing(GPTModel({**GPT_CONFIG_124M, **SMALL, "drop_rate": 0.0}))
    counts = []
    model.trf_blocks[1].att.register_forward_hook(lambda *a: counts.append(1))
    ids = torch.randint(0, 97, (1, 8))
    model.train()
    model(ids).sum().backward()
    assert len(counts) == 2  # forward, then again in the backward pass
    counts.clear()
    with torch.no_grad():
        model(ids)
    assert len(counts) == 1


def test_a_deep_copy_runs_its_own_blocks():
    import copy

    torch.manual_seed(0)
    model = enable_gradient_checkpointing(GPTModel({**GPT_CONFIG_124M, **SMALL, "drop_rate": 0.0}))
    twin = copy.deepcopy(model)
    assert is_gradient_checkpointing(twin)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    ids = torch.randint(0, 97, (1, 8))
    twin.train()
    out = twin(ids)
    assert torch.count_nonzero(out) == 0  # the copy's zeroed weights, not the original's
    out.sum().backward()
    assert all(p.grad is not None for p in twin.parameters()) and all(p.grad is None for p in model.parameters())
