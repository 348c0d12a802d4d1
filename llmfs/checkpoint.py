"""Saving and loading models and training state safely (section 5.4).

Files are written atomically (temporary file, then rename) and read with
`torch.load(..., weights_only=True)` or safetensors, which never unpickle
arbitrary Python objects. A state dict that does not fit the model raises an
error that names the mismatching tensors instead of loading half of it.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from llmfs.atomic import atomic_path
from llmfs.errors import InvalidInput


class CheckpointMismatchError(InvalidInput):
    """A state dict's keys or shapes do not match the model."""


class CheckpointFileError(InvalidInput):
    """A file given as a checkpoint is empty, damaged or of another kind, or holds a config no model can have."""


def check_tensors(state_dict: object, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Raise CheckpointFileError unless `state_dict` is a dict of tensors (what a file read as a
    model's weights must hold); return it."""
    if not isinstance(state_dict, dict):
        raise CheckpointFileError(f"{source} holds a {type(state_dict).__name__} where the model's weights "
                                  "(a dict of tensors) should be")
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointFileError(f"{source}: the model's weights should all be tensors, but {not_tensors[:5]} "
                                  f"{'are' if len(not_tensors) > 1 else 'is'} not")
    return state_dict


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and wrongly shaped tensors
    (CheckpointFileError when `state_dict` is not a dict of tensors at all)."""
    check_tensors(state_dict, source)
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

    A file that is missing, empty, truncated, not a PyTorch/safetensors file, or that needs
    arbitrary Python objects to load, raises CheckpointFileError (a UserError: one line from a
    command) naming the file, instead of the loader's own error.
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
            raise CheckpointFileError(
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
    """Save the weights only (.pth via torch.save, or .safetensors), atomically.

    Any model saves, a model laid out for decoding (`llmfs.decoding_layout`) included: safetensors
    stores tensors contiguously, so each is written in its standard layout, and a tied pair (one
    Parameter under two names) once, under the name safetensors' own `save_model` keeps.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            state, metadata = _one_name_per_tensor(model.state_dict())
            # The model's config travels in the file's metadata (read back by `saved_config`).
            cfg = getattr(model, "cfg", None)
            if isinstance(cfg, dict):
                metadata["config"] = json.dumps(cfg)
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata or None)
        else:
            torch.save(model.state_dict(), tmp)  # keeps strides and shared tensors as they are
    return path


def _one_name_per_tensor(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop the second name of a tensor shared under two names (safetensors refuses shared tensors).

    Keeps the alphabetically first name, as safetensors' `save_model` does (`out_head.weight` of the
    tied GPT-2 pair; `fill_tied` restores the other), and records each dropped name in the metadata
    (dropped name -> kept name). Works for non-contiguous tensors, which safetensors' own check cannot read.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    kept, metadata = dict(state), {}
    for names in groups.values():
        first, *others = sorted(names)
        for other in others:
            del kept[other]
            metadata[other] = first
    return kept, metadata


def read_config_json(path: str | os.PathLike, what: str = "model config") -> dict:
    """The JSON object in `path` (a config.json): a file that is not JSON, or holds something other than an
    object, is the user's to fix (CheckpointFileError naming it)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointFileError(f"{path} holds a {type(cfg).__name__}, not a {what} (an object)")
    return cfg


def saved_config(path: str | os.PathLike) -> dict | None:
    """The GPT config stored with a file, when there is one.

    Looks at a training checkpoint's "config" entry, a .safetensors file's metadata, and a
    `config.json` next to the file (written by `python -m ch05.gpt_train` (`ch05.cli.pretrain`)). None when none is found.
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
            try:
                cfg = json.loads(meta["config"])
            except json.JSONDecodeError as exc:
                raise CheckpointFileError(f"{path}: the config in its metadata is not valid JSON ({exc})") from None
            if not isinstance(cfg, dict):
                raise CheckpointFileError(f"{path}: the config in its metadata is a {type(cfg).__name__}, "
                                          "not an object of settings")
            return cfg
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


# Config keys of the project's models (GPT, Llama, Qwen3) and the values each must have.
SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups",
             "head_dim", "num_classes", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
FLAG_KEYS = ("qkv_bias", "tie_weights", "use_sdpa")


def check_model_config(cfg: object, source: str, required: Iterable[str] = ()) -> dict:
    """A model config read from a file, checked before a model is built from it.

    It must be a dict with the `required` keys; sizes (`SIZE_KEYS`) whole numbers >= 1, dropout
    rates (`drop_rate*`) numbers in [0, 1), flags (`FLAG_KEYS`) true or false, and, without an
    explicit head_dim, emb_dim a multiple of n_heads. A bad one raises CheckpointFileError naming
    `source` (one line from a command) instead of a KeyError or TypeError deep inside a layer.
    Returns `cfg`.
    """
    def bad(problem: str) -> CheckpointFileError:
        return CheckpointFileError(f"{source}: the model config {problem}; was the file written by this "
                                   "project (config.json beside the weights, or a checkpoint's 'config')?")

    if not isinstance(cfg, dict):
        raise bad(f"is a {type(cfg).__name__}, not an object of settings")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise bad(f"lacks {missing}")
    for key, value in cfg.items():
        if key in SIZE_KEYS and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                       or value < 1):
            raise bad(f"has {key} = {value!r}, not a whole number >= 1")
        if key.startswith("drop_rate") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                            or not (math.isfinite(value) and 0 <= value < 1)):
            raise bad(f"has {key} = {value!r}, not a dropout rate in [0, 1)")
        if key in FLAG_KEYS and not isinstance(value, bool):
            raise bad(f"has {key} = {value!r}, not true or false")
    if cfg.get("head_dim") is None and isinstance(cfg.get("emb_dim"), int) and isinstance(cfg.get("n_heads"), int) \
            and cfg["emb_dim"] % cfg["n_heads"]:
        raise bad(f"has emb_dim {cfg['emb_dim']}, which n_heads {cfg['n_heads']} does not divide")
    return cfg


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
