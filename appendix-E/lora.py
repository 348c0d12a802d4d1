"""Appendix E: LoRA (low-rank adaptation) for any model built from `nn.Linear` layers.

Instead of updating a layer's full weight matrix W (in_dim x out_dim as `x @ W`), LoRA keeps W
frozen and learns a low-rank update A @ B, with A: (in_dim, rank) and B: (rank, out_dim). A
LoRA-wrapped layer computes

    linear(x) + alpha * (x @ A @ B)

Scaling convention: like the book, the update is multiplied by `alpha` itself, not by
alpha / rank as in the LoRA paper and the `peft` library; with rank=16, alpha=16 the book's
setting equals peft's alpha=256. B starts at zero, so a freshly wrapped model computes exactly
what the base model computes, and training starts from the pretrained behaviour.

E.1 `LoRALayer`, `LinearWithLoRA`; E.3 `replace_linear_with_lora`, `freeze_parameters`,
`count_trainable_parameters`, `add_lora`; plus `merge_lora`, which folds the adapters back into
plain `nn.Linear` layers (W_merged = W + alpha * (A @ B).T) for inference without overhead.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn


class LoRALayer(nn.Module):
    """The low-rank update alpha * (x @ A @ B) on its own (section E.1).

    A is initialised like an `nn.Linear` weight (Kaiming-uniform with a=sqrt(5)), B with zeros,
    so the update is zero until B has been trained, while the gradient of B is not zero
    (it depends on x @ A), which lets training start.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float,
                 device=None, dtype=None):
        super().__init__()
        if rank < 1:  # New: a clear error instead of an empty matrix
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        factory = {"device": device, "dtype": dtype}  # New: created where the wrapped layer lives
        self.A = nn.Parameter(torch.empty(in_dim, rank, **factory))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim, **factory))
        self.rank = rank  # New: kept for printing
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in_dim) @ (in_dim, rank) @ (rank, out_dim) -> (..., out_dim)
        return self.alpha * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:  # New: for merging the update into the weight
        """The update in `nn.Linear`'s (out_dim, in_dim) weight layout: alpha * (A @ B).T."""
        return self.alpha * (self.A @ self.B).T

    def extra_repr(self) -> str:  # New: rank and alpha in print(model)
        return f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, alpha={self.alpha}"


class LinearWithLoRA(nn.Module):
    """An existing `nn.Linear` plus a `LoRALayer` of the same shape: linear(x) + lora(x).

    The wrapped layer is kept as `.linear`, so its weights (and names like
    `...W_query.linear.weight`) stay reachable, e.g. for loading or freezing.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha,
                              device=linear.weight.device, dtype=linear.weight.dtype)  # New: device, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)

    @torch.no_grad()
    def merge(self) -> nn.Linear:  # New: fold the adapter back in for inference
        """A new plain `nn.Linear` with weight W + alpha * (A @ B).T and the same bias.

        It computes what this module computes (up to floating-point rounding) without the
        extra matrix products. The new layer's parameters require gradients like the base's did.
        """
        base = self.linear
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_(base.weight + self.lora.delta_weight().to(base.weight.dtype))
        merged.weight.requires_grad_(base.weight.requires_grad)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
            merged.bias.requires_grad_(base.bias.requires_grad)
        return merged


# New: `--lora-targets` names which linear layers get adapters, by the short names the Hugging Face
# world uses (q_proj, ..., down_proj), matched against our module names: the families' blocks
# (ch05.llama: att.W_query ... ff.fc1/fc2/fc3, also inside a mixture of experts) and GPT's
# (att.W_query ..., ff.layers.0 = up, ff.layers.2 = down).
LORA_TARGETS = {
    "q": r"att\.W_query", "k": r"att\.W_key", "v": r"att\.W_value", "o": r"att\.out_proj",
    "gate": r"ff\.fc1(\.\d+)?", "up": r"ff\.fc2(\.\d+)?|ff\.layers\.0", "down": r"ff\.fc3(\.\d+)?|ff\.layers\.2",
    "head": r"out_head",
}


def parse_lora_targets(text: str | None) -> tuple[str, ...] | None:  # New: for the command lines
    """Turn "q,k,v,o" into ("q", "k", "v", "o"), and None or "all" into None (every linear layer);
    ValueError naming the choices for an unknown name."""
    if text is None or text.strip() == "all":
        return None
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown LoRA target(s) {unknown or text!r}; give a comma-separated list of "
                         f"{', '.join(LORA_TARGETS)} (or all)")
    return names


def _is_target(name: str, targets) -> bool:
    if targets is None:
        return True
    return any(re.search(rf"(^|\.)({LORA_TARGETS[t]})$", name) for t in targets)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wrap every `nn.Linear` inside `model` (recursively, in place) in a `LinearWithLoRA`.

    Layers that are already wrapped are left alone, so calling it twice does not stack adapters.
    Returns the model for convenience.
    """
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):  # New: never wrap a wrapped layer twice
            continue
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
    return model  # New: returned for convenience


def replace_target_linears_with_lora(model: nn.Module, rank: int, alpha: float, targets=None) -> nn.Module:
    """New: `replace_linear_with_lora` for only the linear layers `targets` names (names from
    LORA_TARGETS, e.g. ("q", "v"), matched against each layer's name inside the model); None: every one."""
    if targets is None:
        return replace_linear_with_lora(model, rank, alpha)
    for parent_name, parent in list(model.named_modules()):
        for name, module in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            if isinstance(module, nn.Linear) and _is_target(full_name, targets):  # a wrapped one is a LinearWithLoRA
                setattr(parent, name, LinearWithLoRA(module, rank, alpha))
    return model


def freeze_parameters(model: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of `model` (the base weights stay as they are)."""
    for param in model.parameters():
        param.requires_grad = False
    return model


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that will receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora(model: nn.Module, rank: int, alpha: float, targets=None) -> int:
    """Freeze all current weights, then add LoRA adapters to every linear layer (New: or the `targets`).

    Afterwards only the adapters' A and B matrices are trainable; returns how many parameters
    that is. (Freezing first matters: the new A and B must stay trainable.)
    """
    freeze_parameters(model)
    replace_target_linears_with_lora(model, rank, alpha, targets)
    return count_trainable_parameters(model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every LoRA adapter in `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALayer) for p in (m.A, m.B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LinearWithLoRA` inside `model` (in place) by its merged plain `nn.Linear`.

    The merged model has the base model's architecture and parameter names again (the
    adapters are folded into the weights) and gives the same outputs as the LoRA model.
    A bare `LinearWithLoRA` passed in is returned merged. Returns the model.
    """
    if isinstance(model, LinearWithLoRA):
        return model.merge()
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            setattr(model, name, module.merge())
        else:
            merge_lora(module)
    return model
