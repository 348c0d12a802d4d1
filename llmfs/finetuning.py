"""What fine-tuning needs around the book's code, shared by chapters 6 and 7 (and DPO).

Saving fine-tuned weights with the config needed to rebuild them (`save_with_config`,
`load_with_config`, which takes the chapter's model builder), a fingerprint of a model's weights
(`weights_fingerprint`), the command-line options for where the model comes from, and a
CPU-thread limit for small models. Where the starting model
comes from (OpenAI's GPT-2 weights, a chapter-5 file) is the chapters' (`ch06.cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn

from llmfs.atomic import atomic_write
from llmfs.checkpoint import check_model_config, load_model, save_model
from llmfs.cli import add_quick_argument, positive_int
from llmfs.errors import InvalidInput


def save_with_config(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """The weights (chapter 5's atomic `save_model`) and, beside them (same name, .json), the config
    and `metadata`, so `load_with_config` can rebuild the model without knowing its settings."""
    path = save_model(model, path)
    with atomic_write(path.with_suffix(".json")) as f:
        json.dump({"config": dict(model.cfg), **metadata}, f, indent=2)
    return path


def load_with_config(path: str | os.PathLike, device=None, *, build: Callable[[dict], nn.Module],
                     required: Iterable[str] = ()) -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata) from the files `save_with_config` wrote.

    `build(metadata)` makes the empty model (chapter 7: `GPTModel(metadata["config"])`); the config is
    checked first (`llmfs.checkpoint.check_model_config`, with the `required` keys of the chapter's
    model), so a damaged .json is one line naming it, not a KeyError from inside the model.
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: it holds the model's config and is written next to "
                                "the weights when they are saved")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise InvalidInput(f"{meta_path} holds no model config (a 'config' object)")
    check_model_config(meta["config"], str(meta_path), required)
    model = build(meta)
    load_model(model, path)
    return model.to(device or "cpu").eval(), meta


def weights_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the model's weights (names and bytes, wherever they live), e.g. to make sure a resumed
    run rebuilds the same frozen reference model it started from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@contextlib.contextmanager
def cpu_threads(num_threads: int | None):
    """Temporarily run PyTorch's CPU ops on `num_threads` threads (None: leave the setting alone).

    A quick model's matrices are so small that extra threads only add synchronisation; on a
    busy machine (other processes on the same cores) several threads can be ten times slower.
    """
    if not num_threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_model_source_args(p: argparse.ArgumentParser, default_model: str, quick_help: str) -> None:
    """Where the model to fine-tune comes from: --model (pretrained), --quick, --from-scratch, --init-checkpoint."""
    p.add_argument("--model", default=default_model,
                   help=f"pretrained GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder/file "
                        f"with its weights (default {default_model})")
    add_quick_argument(p, quick_help)
    p.add_argument("--from-scratch", action="store_true",
                   help="no pretrained weights: random init of the --model shape, all layers trained")
    p.add_argument("--init-checkpoint", default=None,
                   help="start from a chapter-5 checkpoint.pth or model.pth instead of random/pretrained weights")
    p.add_argument("--n-heads", type=positive_int, default=None,
                   help="attention heads of --init-checkpoint, if its file holds no config")
