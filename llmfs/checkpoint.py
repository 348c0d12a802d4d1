"""Saving and loading models and training state safely (section 5.4).

Files are written atomically (temporary file, then rename) and read with
`torch.load(..., weights_only=True)` or safetensors, which never unpickle
arbitrary Python objects. A state dict that does not fit the model raises an
error that names the mismatching tensors instead of loading half of it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from llmfs.atomic import atomic_path
from llmfs.errors import InvalidInput


class CheckpointMismatchError(InvalidInput):
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


def load_state_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """The tensors (and plain values) of a .pth or .safetensors file, never unpickling arbitrary objects.

    A file that is missing, empty, truncated or not a PyTorch/safetensors file raises
    CheckpointFileError (a ValueError) naming the file, instead of the loader's own error.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointFileError(f"{path} is empty (0 bytes): not a checkpoint; was its writer killed?")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointFileError(f"{path} is not a readable .safetensors file ({_first_line(exc)})") from None
    try:
        # weights_only=True: only tensors, numbers, strings and containers of them are rebuilt;
        # a file that needs arbitrary Python objects (which could run code) is refused.
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if is_torch_file(path):
            raise pickle.UnpicklingError(
                f"{path} holds more than tensors and plain Python values, so it was not loaded "
                f"(torch.load(..., weights_only=True) refuses arbitrary objects): {_first_line(exc)}"
            ) from None
        raise CheckpointFileError(f"{path} is not a PyTorch checkpoint ({_first_line(exc)})") from None
    except (EOFError, RuntimeError, KeyError, IndexError, ValueError, OSError, TypeError,
            AttributeError, ImportError) as exc:
        kind = "a truncated or damaged PyTorch file" if is_torch_file(path) else "not a PyTorch checkpoint"
        raise CheckpointFileError(f"{path} is {kind} ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointFileError(f"{path} holds a {type(data).__name__}, not a dict of tensors (a state dict)")
    return _drop_book_masks(data, path)


class CheckpointFileError(InvalidInput):
    """A file given as a checkpoint is empty, damaged or of another kind."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def is_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive; the legacy format starts with a pickle protocol byte."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


_BOOK_MASK = re.compile(r"^trf_blocks\.\d+\.att\.mask$")


def _drop_book_masks(data, path: Path):
    """Remove the causal-mask buffers the book's GPTModel saves (`trf_blocks.N.att.mask`); ours are
    non-persistent and rebuilt by the model. Only masks that are exactly causal are dropped."""
    state = data.get("model_state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        return data
    masks = [k for k, v in state.items() if _BOOK_MASK.match(k) and isinstance(v, torch.Tensor) and v.dim() == 2
             and torch.equal(v.bool(), torch.triu(torch.ones_like(v, dtype=torch.bool), diagonal=1))]
    if not masks:
        return data
    warnings.warn(f"{path}: dropped {len(masks)} attention-mask buffers (trf_blocks.N.att.mask) saved by the "
                  "book's GPTModel; our model builds its own causal mask", stacklevel=3)
    state = {k: v for k, v in state.items() if k not in masks}
    return {**data, "model_state_dict": state} if "model_state_dict" in data else state


TIED_PAIR = ("tok_emb.weight", "out_head.weight")


def fill_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Restore the name safetensors dropped from a tied pair (it keeps only one name per shared tensor)."""
    a, b = TIED_PAIR
    if a in state and b not in state:
        return {**state, b: state[a]}
    if b in state and a not in state:
        return {**state, a: state[b]}
    return state


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the weights only (.pth via torch.save, or .safetensors), atomically."""
    path = Path(path)
    state = model.state_dict()
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_model as st_save_model

            # save_model handles tied (shared) tensors, which save_file refuses. The model's
            # config travels in the file's metadata (read back by `saved_config`).
            cfg = getattr(model, "cfg", None)
            metadata = {"config": json.dumps(cfg)} if isinstance(cfg, dict) else None
            st_save_model(model, str(tmp), metadata=metadata)
        else:
            torch.save(state, tmp)
    return path


def saved_config(path: str | os.PathLike) -> dict | None:
    """The GPT config stored with a file, when there is one.

    Looks at a training checkpoint's "config" entry, a .safetensors file's metadata, and a
    `config.json` next to the file (written by `ch05.gpt_train.main`). None when none is found.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise CheckpointFileError(f"{path} is not a readable .safetensors file ({_first_line(exc)})") from None
        if "config" in meta:
            return json.loads(meta["config"])
    elif path.is_file():
        data = load_state_file(path)
        if isinstance(data.get("config"), dict):
            return dict(data["config"])
    return sidecar_config(path)


def sidecar_config(path: str | os.PathLike) -> dict | None:
    """Our GPT config from `config.json` beside `path`, or None (also for a Hugging Face config.json)."""
    sidecar = Path(path).parent / "config.json"
    if sidecar.is_file():
        try:
            cfg = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointFileError(f"{sidecar} (the model's config) is not valid JSON ({exc})") from None
        if isinstance(cfg, dict) and "emb_dim" in cfg:  # ours, not Hugging Face's (n_embd, ...)
            return cfg
    return None


def load_model(model: nn.Module, path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Load weights saved by `save_model` (or a full checkpoint's model part) into `model`."""
    data = load_state_file(path, map_location)
    state = data["model_state_dict"] if "model_state_dict" in data else data
    if Path(path).suffix == ".safetensors" and hasattr(model, "out_head") and hasattr(model, "tok_emb"):
        # safetensors' save_model keeps one name of a tied pair (alphabetically the first,
        # out_head.weight); both names get the same values back.
        state = fill_tied(state)
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
    data = load_state_file(path, map_location)
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
