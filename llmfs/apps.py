"""What the chapters' web apps share (`python -m ch05.ui`, `ch06.ui.app`, `ch07.ui.app`).

Each app is a small Gradio page around a chapter's model. This module holds the parts they
have in common, so each app file shows only its own page:

- the command line: `--model` (default: what the chapter's CLI wrote last), `--host`, `--port`;
- loading the model so that a missing or mismatched file becomes a message in the page,
  not a traceback in the terminal;
- streaming text: `llmfs.generate_stream.generate_stream` yields token ids one by one, and
  `stream_text` turns them into the text so far, so the page fills in as tokens arrive.

Offline by design: Gradio's analytics (and its version check) are off, there is no share link,
the server listens on 127.0.0.1 unless `--host` says otherwise, and the default theme's fonts
ship with Gradio.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio: no telemetry, no version check

import gradio as gr
import torch
import torch.nn as nn

from llmfs.decoding_layout import layout_for_decoding
from llmfs.generate_stream import generate_stream

EMPTY_INPUT_MESSAGE = "Please type some text first."


def newest_file(folder: str | os.PathLike, patterns: tuple[str, ...]) -> Path | None:
    """The most recently written file in `folder` matching one of `patterns`, or None."""
    found = [p for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


@dataclass
class AppModel:
    """A loaded model and what its loader returned beside it, or the reason there is none."""
    model: nn.Module | None
    info: Any = None         # the loader's second value: a description or the saved metadata
    error: str | None = None  # shown in the page instead of answers
    note: str = ""           # warnings from loading (e.g. a guessed config), shown until the first answer


# What loading a user's file can raise: a missing file, the wrong kind of file, a state dict
# that does not fit the config (llmfs.checkpoint.CheckpointMismatchError is a ValueError), no
# GPT-2 weights offline (ch05.gpt_download.PretrainedWeightsUnavailable is a RuntimeError).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError)


def load_app_model(loader: Callable[..., tuple[nn.Module, Any]], spec: str, device, hint: str) -> AppModel:
    """`loader(spec, device)` -> (model, info), with any failure turned into a page message.

    `hint` says how to get a model (which CLI writes one, which `--model` to try).
    """
    if Path(spec).suffix in (".pth", ".safetensors", ".json") and not Path(spec).exists():
        return AppModel(None, error=f"**No model:** `{spec}` does not exist. {hint}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = loader(spec, device)
    except LOAD_ERRORS as exc:
        return AppModel(None, error=f"**Could not load `{spec}`:** {exc}\n\n{hint}")
    note = " ".join(f"**Note:** {w.message}" for w in caught)
    # Text apps decode token by token: the faster weight layout for that (llmfs.decoding_layout).
    return AppModel(layout_for_decoding(model.eval()), info, note=note)


def stream_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                top_k: int | None = None, seed: int = 123, eos_id: int | None = None) -> Iterator[str]:
    """Yield the prompt and its continuation as text, once per new token.

    The whole sequence is decoded each time: a character made of several byte-level tokens
    only appears once all of them are there, and the last text is exactly what
    `ch05.gpt_generate.generate` gives for the same `seed` and settings.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})], device=device)  # (1, num_tokens)
    token_ids = idx[0].tolist()
    generator = torch.Generator(device=device).manual_seed(int(seed))
    for token in generate_stream(model, idx, int(max_new_tokens), context_size=model.cfg["context_length"],
                                 temperature=float(temperature), top_k=top_k, eos_id=eos_id,
                                 generator=generator):
        token_ids.append(token)
        yield tokenizer.decode(token_ids)


def serve_app(build_demo: Callable[[str, torch.device], gr.Blocks], description: str, default_model: str,
              model_help: str, argv=None) -> int:
    """Each app's `main`: read the command line, build the page, serve it until Ctrl-C.

    Exit code 2 with a one-line `error:` for a bad device or a port that is taken; a model that cannot be
    loaded is reported in the page instead, where the user is looking.
    """
    from llmfs.runtime import get_device

    p = argparse.ArgumentParser(prog=f"python -m {build_demo.__module__}", description=description)
    p.add_argument("--model", default=default_model, help=f"{model_help} (default: {default_model})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    args = p.parse_args(argv)
    try:
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
        device = get_device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo = build_demo(args.model, device)
    try:
        launch(demo, args.host, args.port)
    except OSError as exc:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve `demo` on host:port (no share link) and return its URL; `block=False` returns at once."""
    # Gradio queues each event with a concurrency limit of 1: two visitors never run the
    # model (and its KV cache) at the same time.
    demo.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False,
                        prevent_thread_lock=True, quiet=True, footer_links=["settings"])
    if block:
        print(f"Open {demo.local_url} in your browser; Ctrl-C stops the app.")
        demo.block_thread()
    return demo.local_url
