"""Saving and loading models and training state safely (section 5.4).

Files are written atomically (temporary file, then rename) and read with
`torch.load(..., weights_only=True)` or safetensors, which never unpickle
arbitrary Python objects. A state dict that does not fit the model raises an
error that names the mismatching tensors instead of loading half of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ch02.atomic import atomic_path


class CheckpointMismatchError(ValueError):
    """A state dict's keys or shapes do not match the model."""


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and wrongly shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:10]))
        raise CheckpointMismatchError(
            f"{source} does not fit the model ({'; '.join(parts)}). Was it saved from a model with a different "
            "config (emb_dim, n_layers, context_length, vocab_size, qkv_bias)?"
        )


def _load_file(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return torch.load(path, map_location=map_location, weights_only=True)


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the weights only (.pth via torch.save, or .safetensors), atomically."""
    path = Path(path)
    state = model.state_dict()
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_model as st_save_model

            # save_model handles tied (shared) tensors, which save_file refuses.
            st_save_model(model, str(tmp))
        else:
            torch.save(state, tmp)
    return path


def load_model(model: nn.Module, path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Load weights saved by `save_model` (or a full checkpoint's model part) into `model`."""
    data = _load_file(path, map_location)
    state = data["model_state_dict"] if "model_state_dict" in data else data
    if hasattr(model, "out_head") and "out_head.weight" not in state and "tok_emb.weight" in state:
        # safetensors' save_model drops one name of a tied pair; the model ties them again.
        state = {**state, "out_head.weight": state["tok_emb.weight"]}
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state)
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    **training_state) -> Path:
    """Model + optimizer + training state (step, RNG states, loss history), written atomically."""
    payload = {"model_state_dict": model.state_dict(), **training_state}
    if optimizer is not None:
        payload["optimizer_state_dict"] = optimizer.state_dict()
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location="cpu") -> dict:
    """Restore model (and optimizer) in place; return the rest of the saved training state."""
    data = _load_file(path, map_location)
    if "model_state_dict" not in data:
        raise CheckpointMismatchError(f"{path} is not a training checkpoint (no 'model_state_dict'); "
                                      "use load_model() for a weights-only file")
    check_state_dict(model, data["model_state_dict"], source=str(path))
    model.load_state_dict(data["model_state_dict"])
    if optimizer is not None:
        if "optimizer_state_dict" not in data:
            raise CheckpointMismatchError(f"{path} has no optimizer state to resume from")
        optimizer.load_state_dict(data["optimizer_state_dict"])
    return {k: v for k, v in data.items() if k not in ("model_state_dict", "optimizer_state_dict")}
