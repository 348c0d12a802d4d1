"""What the chat layer (`llmfs.chat`) needs to serve Llama 3.x, Qwen3 and Gemma 3 models, not only GPT-2.

A `ChatModel` talks to its tokenizer through a tiktoken-like interface (`encode`, `decode`,
`decode_single_token_bytes`), because the server streams an answer as UTF-8 bytes decoded
token by token. The other families ship a Hugging Face `tokenizer.json` instead:

* `HFTokenizer` puts that interface on a `tokenizers.Tokenizer`. A token's bytes depend on the
  file's decoder: byte-level BPE (Llama 3, Qwen3: every byte is written as one printable
  character, GPT-2's table) or SentencePiece-style pieces (Gemma: "▁" for a space, `<0xE2>` byte
  tokens for what the vocabulary lacks). Special tokens decode to nothing, as
  `decode(..., skip_special_tokens=True)` does, so the streamed text is the decode of the answer.
* `chat_template(family)` writes a conversation the way the family's own chat template does
  (the Jinja `chat_template` of its tokenizer_config.json), ending with the generation prompt:
  Llama 3's header tokens, Qwen3's ChatML (thinking off: an empty `<think>` block), Gemma 3's
  turns (no system role: the system message opens the first user turn).
* `OLLAMA_FAMILIES`: the names Ollama's /api/show and /api/tags report for each family.

Only `tokenizers` is needed: the chapters' model code stays in the chapters (`ch07.cli` loads
a folder through `ch05.llama.generate_llm.load_llm` and builds the `ChatModel`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache

from llmfs.errors import InvalidInput

# config.json's model_type -> Ollama's family name (what `ollama show` prints for such a model)
OLLAMA_FAMILIES = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3",
                   "gpt2": "gpt2"}


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoders(spec: dict | None) -> list[dict]:
    """The decoder steps of a tokenizer.json, a Sequence flattened."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [d for inner in spec.get("decoders", []) for d in _decoders(inner)]
    return [spec]


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the tiktoken-like interface `llmfs.chat.ChatModel` uses."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        spec = json.loads(tokenizer.to_str())
        steps = _decoders(spec.get("decoder"))
        kinds = {d.get("type") for d in steps}
        self.byte_level = "ByteLevel" in kinds
        supported = {"ByteLevel", "Replace", "ByteFallback", "Fuse"}
        if not self.byte_level and not kinds <= supported:
            # e.g. Llama 2's "Strip" (a leading space dropped once per text): not one token's bytes
            raise InvalidInput(f"the tokenizer's decoder ({', '.join(sorted(kinds - supported))}) cannot be "
                               "decoded token by token; the chat layer serves byte-level BPE (Llama 3, Qwen3) "
                               "and SentencePiece-style (Gemma) tokenizers")
        self.replacements = [(d["pattern"].get("String", ""), d.get("content", "")) for d in steps
                             if d.get("type") == "Replace" and "String" in d.get("pattern", {})]
        self.byte_fallback = "ByteFallback" in kinds
        added = spec.get("added_tokens", [])
        self.special_ids = {t["id"] for t in added if t.get("special")}
        self.added = {t["id"]: t["content"] for t in added if not t.get("special")}
        self._bytes: dict[int, bytes] = {}

    @property
    def n_vocab(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allowed_special=None) -> list[int]:
        """Token ids of `text` as written: special tokens in it (a chat template's) are recognised,
        and nothing is added (a template or `plain_prompt` writes the begin-of-text token)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes of one token, so that a character split over several tokens is decoded whole."""
        if token not in self._bytes:
            self._bytes[token] = self._token_bytes(token)
        return self._bytes[token]

    def _token_bytes(self, token: int) -> bytes:
        if token in self.special_ids:
            return b""
        if token in self.added:  # an added token that is not special (Qwen3's <think>): its text
            return self.added[token].encode("utf-8")
        piece = self.tokenizer.id_to_token(token)
        if piece is None:
            return b""
        if self.byte_level:
            table = _byte_level_table()
            return bytes(table[c] for c in piece if c in table)
        if self.byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        for pattern, content in self.replacements:
            piece = piece.replace(pattern, content)
        return piece.encode("utf-8")


# --- The families' chat templates --------------------------------------------------------------

def _llama3(messages: list[dict]) -> str:
    """Llama 3's template: each turn under a role header, its text trimmed, ended by <|eot_id|>."""
    parts = ["<|begin_of_text|>"]
    for m in messages:
        parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{(m.get('content') or '').strip()}"
                     "<|eot_id|>")
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _qwen3(messages: list[dict]) -> str:
    """Qwen3's ChatML with thinking off: the answer starts after an empty <think> block."""
    parts = [f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages]
    parts.append("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    return "".join(parts)


def _gemma3(messages: list[dict]) -> str:
    """Gemma 3's template: user and model turns alternate; a system message opens the first turn."""
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix, messages = (messages[0].get("content") or "") + "\n\n", messages[1:]
    parts = ["<bos>"]
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise InvalidInput("Gemma 3 conversations alternate user and assistant messages, starting with the "
                               "user (after at most one system message)")
        role = "model" if m["role"] == "assistant" else m["role"]
        parts.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{(m.get('content') or '').strip()}"
                     "<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts)


TEMPLATES: dict[str, Callable[[list[dict]], str]] = {
    "llama": _llama3, "qwen3": _qwen3, "qwen3_moe": _qwen3, "gemma3_text": _gemma3}
TEMPLATE_NAMES = {"llama": "llama3", "qwen3": "chatml", "qwen3_moe": "chatml", "gemma3_text": "gemma3"}


def chat_template(family: str) -> Callable[[list[dict]], str]:
    """The function that writes a conversation (dicts with "role" and "content") as `family`'s prompt."""
    if family not in TEMPLATES:
        raise InvalidInput(f"no chat template for {family!r} models; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[family]
