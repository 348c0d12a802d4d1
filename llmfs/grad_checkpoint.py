"""Gradient checkpointing: trade compute for memory while training, one transformer block at a time.

A backward pass needs every intermediate tensor of the forward pass. With checkpointing, a block
keeps only its input; its inside is recomputed during the backward pass
(`torch.utils.checkpoint.checkpoint`). The activations held between forward and backward shrink
from "everything inside every block" to "one tensor per block", at the price of a second forward
pass through each block (about a third more compute per step). The losses and gradients are the
same (dropout masks included: the random state is replayed).

`enable_gradient_checkpointing(model)` works on any model whose blocks sit in `model.trf_blocks`
(chapter 4's GPTModel, the Llama / Qwen3 / Gemma 3 models of ch05.llama). It changes only how the
blocks run, not their parameters or names, so checkpoints and saved weights stay the same; it only
acts while the model is training with gradients on (generation and evaluation run as before).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """A block's forward through `checkpoint` while training with gradients, its plain forward otherwise.

    Bound to the block itself (not a closure over it), so a `copy.deepcopy` of the model runs its own blocks."""
    forward = type(self).forward.__get__(self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _is_checkpointed(block: nn.Module) -> bool:
    return getattr(block.__dict__.get("forward"), "__func__", None) is _checkpointed_forward


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each of `model.trf_blocks` in the backward pass instead of storing its activations."""
    blocks = getattr(model, "trf_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no trf_blocks to checkpoint")
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo `enable_gradient_checkpointing`."""
    for block in getattr(model, "trf_blocks", []):
        if _is_checkpointed(block):
            del block.forward
    return model


def is_gradient_checkpointing(model: nn.Module) -> bool:
    return any(_is_checkpointed(b) for b in getattr(model, "trf_blocks", []))
