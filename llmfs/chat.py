"""A chat layer for a loaded model: build its prompt, stream its answer as text.

One small layer that a server (`llmfs.serve`), a web app or a preference-data generator can
share, so that all of them format prompts and decode tokens the same way:

* `ChatModel.chat_prompt(messages)` turns chat messages into the text the model was trained
  on: the instruction format the chapter passes in (`PromptFormat`: chapter 7's Alpaca
  `format_input` / `format_response`) for an instruction-tuned model, the plain text of the
  conversation for a base model;
* `ChatModel.generation(prompt_ids, options)` runs `llmfs.generate_stream` and yields text pieces,
  decoding UTF-8 across token boundaries and holding back text that may start a stop string;
* `GenerationOptions` is what one answer is generated with; `parse_options` applies a request's
  Ollama options to a server's defaults (Ollama's `num_predict` is `max_new_tokens` here, as in
  `generate_stream` and every command's `--max-new-tokens`), refusing every malformed value with
  a short message (`shown` keeps a client's megabyte-long or deeply nested value out of it).

Loading is the chapter's: `ch07.cli.load_chat_model(spec)` builds a `ChatModel` from a chapter-7
instruction-tuned model or anything chapter 5 reads. New: also from a Llama 3.x, Qwen3 (dense or MoE)
or Gemma 3 text folder (`ch05.llama.generate_llm.load_llm`): the family's tokenizer behind the same
interface, its own chat template, several stop tokens (end of turn, end of text), and its name in
what /api/show reports (`llmfs.chat_families`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import random
import re
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from llmfs.batched import BatchedGeneration
from llmfs.errors import InvalidInput
from llmfs.generate_stream import generate_stream

# Options a client may send that only tune Ollama's runtime (threads, GPU layers, context
# allocation): accepted and ignored, as they cannot change our model's output -- but checked for
# the type Ollama gives them (a whole number, or true/false), as Ollama checks them.
IGNORED_OPTIONS = {
    **dict.fromkeys(("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep"), int),
    **dict.fromkeys(("numa", "low_vram", "use_mmap", "use_mlock", "vocab_only", "f16_kv", "logits_all",
                     "embedding_only"), bool),
}
# Stop strings are compared with the answer after every token: a few short ones are what clients
# send ("\n\n", "###", "<|im_end|>"); thousands of long ones would make each step slow.
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 32, 256
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptFormat:
    """How a chapter writes an instruction and its answer (chapter 7: `format_input`, `format_response`).

    `format_input(entry, style)` is the prompt up to the answer, `format_response(entry, style)` the
    response header and answer; `entry` holds "instruction", "input" and "output".
    """

    styles: tuple[str, ...]
    format_input: Callable[[dict, str], str]
    format_response: Callable[[dict, str], str]


@dataclass(frozen=True)
class GenerationOptions:
    """What one answer is generated with: the server's defaults, and each request's (`parse_options`).

    The defaults are Ollama's sampling defaults (temperature 0.8, top-k 40, top-p 0.9), so a client
    that sends no options gets what it would get from Ollama. Ollama's own answer length is "until
    the model stops"; GPT-2 has no end of context (the window slides), so it is capped at 128 tokens.
    """

    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = 0.9
    seed: int | None = None      # None: a fresh random seed per request (as in Ollama)
    max_new_tokens: int = 128    # Ollama's `num_predict`
    stop: tuple[str, ...] = ()
    truncate: bool = False       # a prompt longer than the context: keep its end instead of refusing
    fill_context: bool = False   # Ollama's num_predict -2: also stop when prompt + answer fill the context

    def as_ollama(self) -> dict:
        """The sampling settings under Ollama's names and conventions (top_k 0 and top_p 1 mean off)."""
        return {"temperature": self.temperature, "top_k": self.top_k or 0,
                "top_p": 1.0 if self.top_p is None else self.top_p, "num_predict": self.max_new_tokens}


# The options a request may set, under Ollama's names (the JSON on the wire): `parse_options` maps them
# to GenerationOptions' fields (num_predict -> max_new_tokens).
OLLAMA_OPTIONS = ("temperature", "top_k", "top_p", "seed", "num_predict", "stop", "truncate")


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4


def shown(value) -> str:
    """A client's JSON value as an error message quotes it: short, whatever its size or nesting."""
    if isinstance(value, (list, dict)):
        return _SHORT.repr(value)
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(options: dict, key: str, kind: type):
    """options[key] as an int or a finite float (JSON's 1e999 is a float infinity, 10**400 an int)."""
    value = options[key]
    wrong = f"option {key!r} must be {'an integer' if kind is int else 'a finite number'}, got {shown(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(wrong)
    try:
        converted = kind(value)
    except (OverflowError, ValueError):  # an infinite float to int, a huge int to float
        raise InvalidInput(wrong) from None
    if (kind is int and converted != value) or (kind is float and not math.isfinite(converted)):
        raise InvalidInput(wrong)
    return converted


def _check_ignored(options: dict) -> None:
    """Runtime-only options change nothing here, but a value of the wrong type is still a client's bug."""
    for key, kind in IGNORED_OPTIONS.items():
        if options.get(key) is None:
            continue
        if kind is bool and not isinstance(options[key], bool):
            raise InvalidInput(f"option {key!r} must be true or false, got {shown(options[key])}")
        if kind is int and not -2**63 <= _number(options, key, int) < 2**63:
            raise InvalidInput(f"option {key!r} must fit in 64 bits, got {shown(options[key])}")
    if options.get("num_ctx") is not None and options["num_ctx"] < 1:
        raise InvalidInput(f"option 'num_ctx' must be >= 1, got {shown(options['num_ctx'])}")


def _num_predict(options: dict, ceiling: int | None) -> dict:
    """GenerationOptions' changes for a request's num_predict: Ollama's -1 (no limit) is the ceiling,
    -2 (fill the context) the ceiling or the room the prompt leaves, whichever is less."""
    num_predict = _number(options, "num_predict", int)
    if ceiling is not None and num_predict in (-1, -2):
        return {"max_new_tokens": ceiling, "fill_context": num_predict == -2}
    if num_predict < 0:
        special = " or -1 (as many as allowed) or -2 (until the context is full)" if ceiling else ""
        raise InvalidInput(f"option 'num_predict' must be >= 0{special}, got {num_predict}")
    if ceiling is not None and num_predict > ceiling:
        raise InvalidInput(f"option 'num_predict' is {num_predict}, more than this server's ceiling of {ceiling} "
                           f"tokens per answer; ask for at most {ceiling} (or -1: as many as allowed)")
    return {"max_new_tokens": num_predict, "fill_context": False}


def parse_options(options: dict | None, defaults: GenerationOptions | None = None,
                  ceiling: int | None = None) -> GenerationOptions:
    """`defaults` with the Ollama-style `options` of one request applied (temperature, top_k, top_p, seed,
    num_predict, stop, truncate; `null` keeps the default).

    Only the request's values are checked (the defaults were checked where they were set: the
    command line's option types): InvalidInput with a one-line reason for a bad one. top_k 0 and
    top_p 1 mean "off", as in Ollama; runtime-only options such as num_ctx are checked and ignored;
    unknown ones are refused. `ceiling`: the most tokens one answer may have (a server's); a larger
    num_predict is refused, and Ollama's -1 and -2 are accepted (without a ceiling they are refused).
    """
    if not isinstance(options, (dict, type(None))):
        raise InvalidInput(f"options must be a JSON object, got {shown(options)}")
    _check_ignored(options or {})
    options = {k: v for k, v in (options or {}).items() if v is not None and k not in IGNORED_OPTIONS}
    unknown = sorted(set(options) - set(OLLAMA_OPTIONS))
    if unknown:
        raise InvalidInput(f"unsupported option(s) {', '.join(shown(k) for k in unknown[:5])}; this server "
                           f"knows {', '.join(OLLAMA_OPTIONS)}")
    changes = {}
    if "temperature" in options:
        changes["temperature"] = temperature = _number(options, "temperature", float)
        if temperature < 0:
            raise InvalidInput(f"option 'temperature' must be >= 0 (0 is greedy), got {temperature}")
    if "top_k" in options:
        top_k = _number(options, "top_k", int)
        if top_k < 0:
            raise InvalidInput(f"option 'top_k' must be >= 0 (0 turns it off), got {top_k}")
        changes["top_k"] = top_k or None
    if "top_p" in options:
        top_p = _number(options, "top_p", float)
        if not 0 < top_p <= 1:
            raise InvalidInput(f"option 'top_p' must be in (0, 1], got {top_p}")
        changes["top_p"] = None if top_p == 1 else top_p
    if "seed" in options:
        changes["seed"] = seed = _number(options, "seed", int)
        if not -2**63 <= seed < 2**64:
            raise InvalidInput(f"option 'seed' must fit in 64 bits, got {shown(seed)}")
    if "num_predict" in options:
        changes.update(_num_predict(options, ceiling))
    if "stop" in options:
        stop = options["stop"]
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidInput(f"option 'stop' must be a string or a list of non-empty strings, got "
                               f"{shown(options['stop'])}")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
            raise InvalidInput(f"option 'stop' may hold at most {MAX_STOP_STRINGS} strings of at most "
                               f"{MAX_STOP_LENGTH} characters each")
        changes["stop"] = tuple(stop)
    if "truncate" in options:
        if not isinstance(options["truncate"], bool):
            raise InvalidInput(f"option 'truncate' must be true or false, got {shown(options['truncate'])}")
        changes["truncate"] = options["truncate"]
    return replace(defaults or GenerationOptions(), **changes)


class PromptTooLong(InvalidInput):
    """The prompt has more tokens than the model's context and the client did not ask to truncate it."""


class TextGeneration:
    """The answer to one prompt, one token per step: iterate for text pieces ("" while text is held back).

    Bytes are decoded incrementally, so a character split over two tokens comes out whole, and
    text that could be the start of a stop string is held back until it is clearly not. After
    the last piece, `done_reason` is "stop" (end-of-text token or a stop string) or "length"
    (`max_new_tokens` tokens, fewer with `fill_context`). `close()` ends the generation early and
    resets the model's cache.
    """

    def __init__(self, chat: ChatModel, prompt_ids: list[int], options: GenerationOptions,
                 batch: BatchedGeneration | None = None):
        self.chat, self.options, self.prompt_ids = chat, options, prompt_ids
        seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device=chat.device).manual_seed(seed)
        idx = torch.tensor([prompt_ids], device=chat.device)  # (1, num_tokens)
        self.max_new_tokens = options.max_new_tokens
        if options.fill_context:  # no more than the context has room for after the prompt
            self.max_new_tokens = min(self.max_new_tokens, max(chat.context_length - len(prompt_ids), 0))
        if batch is not None:  # one row of a batch that others decode in too (the server's scheduler)
            self.tokens = batch.add(prompt_ids, self.max_new_tokens, temperature=options.temperature,
                                    top_k=options.top_k, top_p=options.top_p, eos_id=chat.eos_id,
                                    generator=self.generator)
        else:
            self.tokens = generate_stream(chat.model, idx, self.max_new_tokens, chat.context_length,
                                          temperature=options.temperature, top_k=options.top_k,
                                          eos_id=chat.eos_id, top_p=options.top_p, generator=self.generator)
        self.eval_count = 0
        self.done_reason: str | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self.tokens.close()

    def _cut(self, text: str) -> tuple[str, bool, str]:
        """(text safe to send, whether a stop string was found, text held back)."""
        stops = self.options.stop
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)], True, ""
        # The longest end of `text` that is the beginning of some stop string may still become one.
        keep = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        return text[:len(text) - keep], False, text[len(text) - keep:]

    def _run(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        token_bytes = self.chat.tokenizer.decode_single_token_bytes
        held = ""
        try:
            for token in self.tokens:
                if token in self.chat.stop_ids:  # New: the end of a turn (eos_id stops generate_stream itself)
                    self.done_reason = "stop"
                    piece, _, held = self._cut(held + decoder.decode(b"", final=True))
                    yield piece + held
                    return
                self.eval_count += 1
                piece, stopped, held = self._cut(held + decoder.decode(token_bytes(token)))
                if stopped:
                    self.done_reason = "stop"
                    yield piece
                    return
                yield piece
            piece, stopped, held = self._cut(held + decoder.decode(b"", final=True))
            at_limit = self.eval_count == self.max_new_tokens
            self.done_reason = "length" if at_limit and not stopped else "stop"
            yield piece + held  # the answer is over: what was held back can no longer become a stop string
        finally:
            self.tokens.close()


@dataclass
class ChatModel:
    """A loaded model with what a client needs to talk to it (see the module docstring)."""

    model: nn.Module
    name: str                     # e.g. "gpt2-medium-sft:latest"
    style: str | None             # "alpaca" / "phi3" for instruction-tuned models, None for base models
    description: str
    source: str                   # the file or GPT-2 name it came from
    device: torch.device
    tokenizer: object             # tiktoken-like: encode, decode, decode_single_token_bytes
    eos_id: int                   # the end-of-text token: generation stops there
    prompt_format: PromptFormat | None = None  # the instruction format; needed when `style` is set
    metadata: dict = field(default_factory=dict)
    # New: what a Llama / Qwen3 / Gemma 3 model adds (llmfs.chat_families); GPT models keep the defaults.
    family: str = "gpt2"          # config.json's model_type
    stop_ids: frozenset[int] = frozenset()  # more ids that end an answer (end of turn), beside eos_id
    chat_template: Callable[[list[dict]], str] | None = None  # the family's template; used when `style` is set
    bos: str = ""                 # written before a raw or plain prompt (the begin-of-text token)

    @property
    def context_length(self) -> int:
        return int(self.model.cfg["context_length"])

    def matches(self, requested: str) -> bool:
        """True when a client's model name means this model ("name" is short for "name:latest")."""
        requested = requested.strip().lower()
        return requested == self.name or (":" not in requested and f"{requested}:latest" == self.name)

    # --- prompts -------------------------------------------------------------------------------

    def instruction_prompt(self, instruction: str, response: str = "") -> str:
        """The instruction prompt (the chapter's format) for one instruction, ending where the answer starts."""
        entry = {"instruction": instruction, "input": "", "output": response}
        fmt = self.prompt_format
        return fmt.format_input(entry, self.style) + fmt.format_response(entry, self.style)

    def generate_prompt(self, prompt: str, system: str | None = None, raw: bool = False) -> str:
        """The text for /api/generate: an instruction-tuned model gets the Alpaca format unless `raw`."""
        if raw:
            return self.bos + prompt
        system_message = [{"role": "system", "content": system}] if system else []
        return self.chat_prompt(system_message + [{"role": "user", "content": prompt}])

    def chat_prompt(self, messages: list[dict]) -> str:
        """The text for a conversation (dicts with "role" and "content").

        Instruction-tuned: every user turn becomes an Alpaca instruction followed by its answer
        (consecutive user messages are one instruction); the text ends after the last
        "### Response:" header, or inside a final assistant message, which the model continues.
        System messages are written before the turns as plain text. Base model: the contents
        one after another, separated by blank lines, for the model to continue.
        """
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES
                    and isinstance(m.get("content", ""), str)):
                raise InvalidInput(f"message {i} must have a role ({', '.join(CHAT_ROLES)}) and string content")
        if self.style is None:
            return self.bos + "\n\n".join(m.get("content") or "" for m in messages)
        if self.chat_template is not None:  # New: a family's own template (llmfs.chat_families)
            if messages and messages[-1]["role"] == "assistant":  # an answer begun: the model continues it
                return self.chat_template(messages[:-1]) + (messages[-1].get("content") or "")
            return self.chat_template(messages)
        parts, instruction = [], []
        for m in messages:
            role, content = m["role"], m.get("content") or ""
            if role == "user":
                instruction.append(content)
            elif role == "assistant" and instruction:
                parts.append(self.instruction_prompt("\n\n".join(instruction), content))
                instruction = []
            else:  # a system message, or an assistant message without a question
                parts.append(content)
        if instruction:
            parts.append(self.instruction_prompt("\n\n".join(instruction)))
        return "\n\n".join(parts)

    def encode(self, text: str, truncate: bool = False) -> list[int]:
        """Token ids of `text`. Longer than the context: its last tokens if `truncate`, else PromptTooLong."""
        ids = self.tokenizer.encode(text, allowed_special={"<|endoftext|>"})
        if len(ids) > self.context_length:
            if not truncate:
                n = self.context_length
                raise PromptTooLong(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                                    f"{n} tokens; shorten it, or send \"truncate\": true to keep its last "
                                    f"{n} tokens")
            ids = ids[-self.context_length:]
        return ids

    # --- generation ----------------------------------------------------------------------------

    def generation(self, prompt_ids: list[int], options: GenerationOptions,
                   batch: BatchedGeneration | None = None) -> TextGeneration:
        """An iterator over the answer's text pieces (one step per token); not re-entrant: one at a time.
        With `batch` (`llmfs.batched`), a row of it: each `batch.step()` makes the token of its next piece."""
        if not prompt_ids:
            raise InvalidInput("the prompt is empty: the model needs at least one token to continue")
        return TextGeneration(self, prompt_ids, options, batch)

    def respond(self, messages: list[dict], options: GenerationOptions | None = None) -> str:
        """The whole answer to a conversation, in one call (for scripts and data generators)."""
        options = options or GenerationOptions()
        return "".join(self.generation(self.encode(self.chat_prompt(messages), options.truncate), options))

    # --- what /api/tags and /api/show report ---------------------------------------------------

    @property
    def ollama_family(self) -> str:
        """The family's name as Ollama reports it ("llama", "qwen3", "qwen3moe", "gemma3", "gpt2")."""
        from llmfs.chat_families import OLLAMA_FAMILIES

        return OLLAMA_FAMILIES.get(self.family, self.family)

    def details(self) -> dict:
        n = sum(p.numel() for p in self.model.parameters())
        dtype = next(self.model.parameters()).dtype
        dtypes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
        folder = Path(self.source).is_dir() and any(Path(self.source).glob("*.safetensors"))
        family = self.ollama_family
        return {"parent_model": "",
                "format": "safetensors" if folder else Path(self.source).suffix.lstrip(".") or "pytorch",
                "family": family, "families": [family],
                "parameter_size": f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.1f}B",
                "quantization_level": dtypes.get(dtype, str(dtype))}

    def model_info(self) -> dict:
        cfg = self.model.cfg
        if self.family != "gpt2":  # New: Ollama's keys, under the family's name
            arch = self.ollama_family
            info = {"general.architecture": arch,
                    "general.parameter_count": sum(p.numel() for p in self.model.parameters()),
                    f"{arch}.context_length": cfg["context_length"], f"{arch}.embedding_length": cfg["emb_dim"],
                    f"{arch}.block_count": cfg["n_layers"], f"{arch}.attention.head_count": cfg["n_heads"],
                    f"{arch}.attention.head_count_kv": cfg.get("n_kv_groups", cfg["n_heads"]),
                    f"{arch}.vocab_size": cfg["vocab_size"], "llmfs.prompt_style": self.style or "none"}
            if "num_experts" in cfg:
                info[f"{arch}.expert_count"] = cfg["num_experts"]
                info[f"{arch}.expert_used_count"] = cfg.get("num_experts_per_tok")
            return info
        return {"general.architecture": "gpt2",
                "general.parameter_count": sum(p.numel() for p in self.model.parameters()),
                "gpt2.context_length": cfg["context_length"], "gpt2.embedding_length": cfg["emb_dim"],
                "gpt2.block_count": cfg["n_layers"], "gpt2.attention.head_count": cfg["n_heads"],
                "gpt2.vocab_size": cfg["vocab_size"], "llmfs.prompt_style": self.style or "none"}

    def template(self) -> str:
        """The prompt format written in Ollama's template syntax (for /api/show)."""
        if self.style and self.chat_template is not None:
            return self.chat_template([{"role": "user", "content": "{{ .Prompt }}"}]) + "{{ .Response }}"
        return self.instruction_prompt("{{ .Prompt }}", "{{ .Response }}") if self.style else "{{ .Prompt }}"

    def file_size_and_digest(self) -> tuple[int, str]:
        """Size of the weights file, and a sha256 of its path, size and time (hashing gigabytes is slow)."""
        path = Path(self.source)
        stat = path.stat() if path.is_file() else None
        size = stat.st_size if stat else sum(p.numel() * p.element_size() for p in self.model.parameters())
        key = json.dumps([str(path.resolve()) if stat else self.source, size, stat.st_mtime if stat else 0])
        return size, hashlib.sha256(key.encode()).hexdigest()


def finetuned_file(path: Path) -> Path | None:
    """The weights file of a chapter-7 model (its `.json` beside it holds "config"), or None."""
    def has_meta(p: Path) -> bool:
        meta = p.with_suffix(".json")
        try:
            return meta.is_file() and "config" in json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return False

    if path.is_file():
        return path if path.suffix in (".pth", ".safetensors") and has_meta(path) else None
    chapter5_files = ("model.safetensors", "model.pth", "checkpoint.pth")
    if not path.is_dir() or any((path / n).is_file() for n in chapter5_files):
        return None
    found = sorted(p for ext in ("*.pth", "*.safetensors") for p in path.glob(ext) if has_meta(p))
    if len(found) > 1:
        raise InvalidInput(f"{path} holds several fine-tuned models ({', '.join(p.name for p in found)}); "
                         "name the file")
    return found[0] if found else None


def default_model_name(spec: str | os.PathLike) -> str:
    """An Ollama-style name for a model: "gpt2-medium-sft:latest" for outputs/ch07/gpt2-medium-sft.pth,
    "ch05-model:latest" for outputs/ch05/model.pth, "gpt2:latest" for "gpt2"."""
    path = Path(spec).expanduser()
    if path.is_dir():
        base = path.resolve().name
    elif path.is_file():
        generic = path.stem in ("model", "checkpoint")
        base = f"{path.resolve().parent.name}-{path.stem}" if generic else path.stem
    else:
        base = str(spec)
    return (re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._") or "model") + ":latest"
