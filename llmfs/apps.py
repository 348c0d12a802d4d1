"""What the chapters' web apps share (`python -m ch05.ui`, `python -m ch06.ui`, `python -m ch07.ui`).

Each app is a small Gradio page around a chapter's model. This module holds the parts they
have in common, so each app file shows only its own page:

- the command line: `app_parser` (`--model`, default: what the chapter's CLI wrote last; `--host`,
  `--port`, `--device`) and `serve_app` (checks, then the page, then serving it until Ctrl-C);
- `page(title)`: the `gr.Blocks` every app builds its page in;
- loading the model so that a missing or mismatched file becomes a message in the page,
  not a traceback in the terminal;
- streaming text: `llmfs.generate_stream.generate_stream` yields token ids one by one, and
  `stream_text` turns them into the text so far, so the page fills in as tokens arrive;
- one thread for the model: Gradio runs a handler's steps on any of its worker threads, but
  PyTorch's CPU kernels are fastest when one thread makes every multi-threaded call of a process
  (`llmfs.serve` says why and what it measured), so the model is loaded and every token made on
  `MODEL_THREAD` (`on_model_thread`).

Offline by design: every page is built with Gradio's analytics (and its version check) off
(`page`, and `launch` refuses a page without it), there is no share link, the server listens on
127.0.0.1 unless `--host` says otherwise, and the default theme's fonts ship with Gradio. Nothing
is set in the environment.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
import torch.nn as nn

from llmfs.cli import USER_ERRORS, Parser, device_name, run, whole_number
from llmfs.decoding_layout import layout_for_decoding
from llmfs.errors import UserError
from llmfs.generate_stream import generate_stream
from llmfs.int8 import quantize_int8
from llmfs.runtime import get_device

EMPTY_INPUT_MESSAGE = "Please type some text first."
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="app-model")  # its thread starts on first use
_DONE = object()


def on_model_thread(items: Iterator) -> Iterator:
    """`items`, each one made on `MODEL_THREAD` (and the iterator closed there: a generation resets its
    cache then). Not for use on that thread itself."""
    try:
        while (item := MODEL_THREAD.submit(next, items, _DONE).result()) is not _DONE:
            yield item
    finally:
        if (close := getattr(items, "close", None)) is not None:
            MODEL_THREAD.submit(close).result()


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


def load_app_model(loader: Callable[..., tuple[nn.Module, Any]], spec: str, device, hint: str,
                   int8: bool | str = False) -> AppModel:
    """`loader(spec, device)` -> (model, info), with any failure turned into a page message; `int8`
    then stores the linear layers' weights as int8 (`llmfs.int8`, the text apps' `--int8`).

    `hint` says how to get a model (which CLI writes one, which `--model` to try). What becomes a
    message is what a command would print as `error:` (a missing or unreadable file, a state dict that
    does not fit, no GPT-2 weights offline: `llmfs.cli.USER_ERRORS`); a bug keeps its traceback.
    """
    if Path(spec).suffix in (".pth", ".safetensors", ".json") and not Path(spec).exists():
        return AppModel(None, error=f"**No model:** `{spec}` does not exist. {hint}")

    def load() -> tuple[nn.Module, Any, list]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = loader(spec, device)
        if int8:
            quantize_int8(model, int8)  # before the layout, which only touches float32 nn.Linear weights
        # Text apps decode token by token: the faster weight layout for that (llmfs.decoding_layout).
        return layout_for_decoding(model.eval()), info, caught

    try:
        model, info, caught = MODEL_THREAD.submit(load).result()  # the thread that will run it
    except USER_ERRORS as exc:
        return AppModel(None, error=f"**Could not load `{spec}`:** {exc}\n\n{hint}")
    return AppModel(model, info, note=" ".join(f"**Note:** {w.message}" for w in caught))


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
    for token in on_model_thread(generate_stream(model, idx, int(max_new_tokens),
                                                 context_size=model.cfg["context_length"],
                                                 temperature=float(temperature), top_k=top_k, eos_id=eos_id,
                                                 generator=generator)):
        token_ids.append(token)
        yield tokenizer.decode(token_ids)


def page(title: str) -> gr.Blocks:
    """The `gr.Blocks` an app builds its page in: Gradio's analytics and version check off."""
    return gr.Blocks(title=title, analytics_enabled=False)


def app_parser(prog: str, description: str, default_model: str, model_help: str) -> Parser:
    """The options every app has; an app adds its own before parsing."""
    p = Parser(prog=prog, description=description)
    p.add_argument("--model", default=default_model, help=f"{model_help} (default: {default_model})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: the network)")
    p.add_argument("--port", type=whole_number(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    return p


def serve_app(args: argparse.Namespace, build_demo: Callable[[torch.device], gr.Blocks]) -> int:
    """Each app's `main` after parsing: build the page with `build_demo(device)` and serve it until
    Ctrl-C; returns the exit code.

    A port that is taken is a one-line `error:` (exit code 2) before the model loads; a model that
    cannot be loaded is reported in the page instead, where the user is looking.
    """
    from llmfs.serve import bind_socket

    def start() -> None:
        bind_socket(args.host, args.port).close()  # taken, or no such address: say so before loading
        demo = build_demo(get_device(args.device))
        try:
            launch(demo, args.host, args.port)
        except OSError as exc:  # taken after all, between the check and now
            raise UserError(f"cannot listen on {args.host}:{args.port} ({exc})") from None

    return run(start)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve `demo` on host:port (no share link) and return its URL; `block=False` returns at once."""
    if demo.analytics_enabled:  # a page built without `page()` would report to Gradio's servers
        raise ValueError("the page was built with Gradio's analytics on; build it with llmfs.apps.page(title)")
    # Gradio queues each event with a concurrency limit of 1: two visitors never run the
    # model (and its KV cache) at the same time.
    demo.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False,
                        prevent_thread_lock=True, quiet=True, footer_links=["settings"])
    if block:
        print(f"Open {demo.local_url} in your browser; Ctrl-C stops the app.")
        demo.block_thread()
    return demo.local_url
