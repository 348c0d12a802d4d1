"""Writing GGUF files (llama.cpp's and Ollama's model format) and the Ollama Modelfile beside them.

The machinery half of `python -m ch07.export_gguf`: the chapter's module says which of its tensors
becomes which GGUF tensor and which hyperparameters the architecture needs; this module

* turns a tiktoken-style byte-level BPE (ranks + special tokens) into the vocabulary and merges that a
  GGUF file carries (`bpe_vocab_from_ranks`): llama.cpp's BPE merges by pair rank, tiktoken by the rank
  of the merged bytes, so each merge is recovered by replaying the ranks below the token's own;
* writes the file atomically, refusing to replace one unless asked (`write_gguf`), with the tensors in
  f32, f16 or q8_0 (`gguf.quants`; 1-D tensors such as norms and biases stay f32, as llama.cpp's own
  converter keeps them, and a matrix whose rows do not split into q8_0's 32-value blocks falls back
  to f16, as there);
* writes the Modelfile (`modelfile_text`, `write_modelfile`) that `ollama create NAME -f FILE` imports.

It needs the `gguf` package (llama.cpp's gguf-py, `pip install gguf`), imported when first used, so the
rest of the project runs without it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmfs.atomic import atomic_path, atomic_write
from llmfs.errors import InvalidInput, UserError

# The types a file can be written in, under llama.cpp's `--outtype` names.
OUTTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32  # q8_0 stores each run of 32 values as 32 int8 and one f16 scale


class GGUFUnavailable(UserError, ImportError):
    """The `gguf` package is not installed."""


def gguf_module():
    """llama.cpp's `gguf` package, or a one-line user error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise GGUFUnavailable("writing GGUF files needs llama.cpp's gguf package: pip install gguf") from None
    return gguf


# --- The tokenizer ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFVocab:
    """A byte-level BPE vocabulary in the form a GGUF file stores it (`tokenizer.ggml.*`).

    `tokens[i]` is token i written with GPT-2's printable byte characters (a leading space is "Ġ"),
    `token_types[i]` gguf's TokenType (1 normal, 3 control), `merges` the "left right" pairs in the
    order they apply. `model` and `pre` name llama.cpp's tokenizer and pre-tokenizer ("gpt2", "gpt-2").
    """

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    model: str = "gpt2"
    pre: str = "gpt-2"
    add_bos: bool = False  # Llama 3 starts every text with <|begin_of_text|>; GPT-2 and Qwen3 start with none


def _parts_below(token: bytes, ranks: Mapping[bytes, int], max_rank: int) -> list[bytes]:
    """The BPE split of `token` using only the merges learned before rank `max_rank`: tiktoken's rule
    (merge the adjacent pair whose bytes have the lowest rank, leftmost on a tie; `ch02.bpe.bpe_word`)
    with the later ranks left out. For the token of rank `max_rank` it ends in the two parts that the
    last merge joined."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def bpe_vocab_from_ranks(ranks: Mapping[bytes, int], special_tokens: Mapping[str, int],
                         byte_chars: Mapping[int, str], eos_id: int, bos_id: int | None = None) -> GGUFVocab:
    """The GGUF vocabulary and merges of a tiktoken byte-level BPE (GPT-2's: 50,000 merges).

    tiktoken stores only ranks; a merge list is recovered token by token: the split of a token under the
    ranks below its own is the pair its merge joined. `byte_chars` is GPT-2's byte -> printable character
    map (`ch02.bpe.bpe.bytes_to_unicode()`). Ids must run from 0 without gaps.
    """
    n = len(ranks) + len(special_tokens)
    tokens: list[str | None] = [None] * n
    types = [1] * n  # gguf.TokenType.NORMAL
    for token, rank in ranks.items():
        tokens[rank] = "".join(byte_chars[b] for b in token)
    for text, i in special_tokens.items():
        tokens[i] = text
        types[i] = 3  # gguf.TokenType.CONTROL
    if any(t is None for t in tokens):
        raise ValueError("token ids must run from 0 to the vocabulary size - 1 without gaps")
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _parts_below(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {rank} ({token!r}) is not the merge of two earlier tokens")
        merges.append(" ".join("".join(byte_chars[b] for b in part) for part in parts))
    return GGUFVocab(tokens=tokens, token_types=types, merges=merges,
                     bos_id=eos_id if bos_id is None else bos_id, eos_id=eos_id)


def bpe_vocab_from_tokenizer_json(path: str | os.PathLike, vocab_size: int, pre: str,
                                  bos: str | None = None, eos: str | None = None, add_bos: bool = False) -> GGUFVocab:
    """The GGUF vocabulary of a Hugging Face byte-level BPE `tokenizer.json` (Llama 3's, Qwen's), padded with
    unused "[PADn]" tokens up to the model's `vocab_size` (its embedding has rows no token uses), as
    llama.cpp's converter does. Special added tokens become control tokens. `pre` names llama.cpp's
    pre-tokenizer ("llama-bpe", "qwen2"); `bos` / `eos` are token texts (None: none)."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        kind, vocab, merges = model.get("type"), model["vocab"], model.get("merges", [])
        added = data.get("added_tokens", [])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"{path} is not a Hugging Face tokenizer.json ({type(exc).__name__}: {exc})") from None
    if kind != "BPE":
        raise InvalidInput(f"{path} holds a {kind} tokenizer; only byte-level BPE (Llama 3, Qwen) exports")
    by_id = {int(i): str(t) for t, i in vocab.items()}
    types = {i: 1 for i in by_id}
    for entry in added:
        by_id[int(entry["id"])] = entry["content"]
        types[int(entry["id"])] = 3 if entry.get("special") else 4  # CONTROL, USER_DEFINED
    if max(by_id) >= vocab_size:
        raise InvalidInput(f"{path} has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, 5) for i in range(vocab_size)]  # 5: UNUSED
    index = {t: i for i, t in enumerate(tokens)}

    def token_id(text: str | None, what: str) -> int | None:
        if text is None:
            return None
        if text not in index:
            raise InvalidInput(f"{path} has no {what} token {text!r}")
        return index[text]

    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # "a b", or ["a", "b"] in newer files
    return GGUFVocab(tokens=tokens, token_types=token_types, merges=merges, bos_id=token_id(bos, "begin"),
                     eos_id=token_id(eos, "end"), pre=pre, add_bos=add_bos)


# --- The file -----------------------------------------------------------------------------------------

def check_output_file(path: str | os.PathLike, overwrite: bool = False, option: str = "--output") -> Path:
    """Refuse, before any work, an output path that is empty, a folder, not .gguf, or an existing file
    (unless `overwrite`), and a folder that cannot be written (`llmfs.cli.check_output_dir`: made when
    missing, a probe file written and removed)."""
    if not str(path).strip():
        raise InvalidInput(f"{option} is empty; name a .gguf file")
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise InvalidInput(f"{option} {path} should end in .gguf")
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; name a .gguf file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{option} {path} already exists; pass --overwrite to replace it, or choose "
                              f"another {option}")
    from llmfs.cli import check_output_dir

    check_output_dir(path.parent, option=option)  # the folder: made if missing, a probe written
    return path


def tensor_type(array: np.ndarray, outtype: str):
    """The GGML type a tensor is stored in for `outtype`: 1-D tensors stay f32; f16 and q8_0 apply to
    matrices, q8_0 only where each row splits into 32-value blocks (else f16)."""
    gguf = gguf_module()
    kinds = gguf.GGMLQuantizationType
    if outtype == "f32" or array.ndim < 2:
        return kinds.F32
    if outtype == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        return kinds.Q8_0
    return kinds.F16


def write_gguf(path: str | os.PathLike, arch: str, metadata: Mapping[str, object],
               tensors: Iterable[tuple[str, np.ndarray]], vocab: GGUFVocab, outtype: str = "f16",
               name: str | None = None, overwrite: bool = False) -> Path:
    """Write a GGUF file for llama.cpp's architecture `arch`; returns the path.

    `metadata` maps GGUF keys ("gpt2.context_length", ...) to values (int -> uint32, float -> float32,
    str, bool); `tensors` yields (GGUF name, float array in PyTorch's [out, in] order, which is GGUF's
    too). Written to a temporary file and renamed, so a crash leaves no half file; an existing file is
    refused unless `overwrite`.
    """
    gguf = gguf_module()
    if outtype not in OUTTYPES:
        raise InvalidInput(f"unknown GGUF type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    with atomic_path(path) as tmp:
        # use_temp_file: each tensor goes to a spooled temporary file as it comes, so memory holds one
        # tensor at a time, not the whole model, before the file is written out in GGUF's order.
        writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
        try:
            writer.add_name(name or path.stem)
            writer.add_file_type(file_types[outtype])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, value in metadata.items():
                if isinstance(value, bool):
                    writer.add_bool(key, value)
                elif isinstance(value, int):
                    writer.add_uint32(key, value)
                elif isinstance(value, float):
                    writer.add_float32(key, value)
                elif isinstance(value, str):
                    writer.add_string(key, value)
                else:
                    raise TypeError(f"metadata {key}: {type(value).__name__} is not int, float, str or bool")
            writer.add_tokenizer_model(vocab.model)
            writer.add_tokenizer_pre(vocab.pre)
            writer.add_token_list(vocab.tokens)
            writer.add_token_types(vocab.token_types)
            writer.add_token_merges(vocab.merges)
            if vocab.bos_id is not None:
                writer.add_bos_token_id(vocab.bos_id)
            if vocab.eos_id is not None:
                writer.add_eos_token_id(vocab.eos_id)
            writer.add_add_bos_token(vocab.add_bos)
            for tensor_name, array in tensors:
                array = np.ascontiguousarray(array, dtype=np.float32)
                kind = tensor_type(array, outtype)
                if kind == gguf.GGMLQuantizationType.F32:
                    writer.add_tensor(tensor_name, array)
                elif kind == gguf.GGMLQuantizationType.F16:
                    writer.add_tensor(tensor_name, array.astype(np.float16))
                else:
                    writer.add_tensor(tensor_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


# --- Ollama's Modelfile -------------------------------------------------------------------------------

def modelfile_path(gguf_path: str | os.PathLike) -> Path:
    """Where the Modelfile of `gguf_path` goes: beside it, `<name>.Modelfile` (several exports can share
    a folder)."""
    return Path(gguf_path).with_suffix(".Modelfile")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise InvalidInput('a Modelfile template cannot hold three double quotes (""")')
    return f'"""{text}"""'


def modelfile_text(gguf_file: str, template: str, stop: Iterable[str] = (),
                   parameters: Mapping[str, object] | None = None, comment: str | None = None) -> str:
    """The Modelfile that `ollama create NAME -f <file>` reads: FROM the GGUF file (a path relative to
    the Modelfile's folder), the prompt TEMPLATE in Ollama's Go-template syntax, the stop strings and
    other PARAMETERs (e.g. num_ctx)."""
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    lines += [f"FROM ./{gguf_file}", f"TEMPLATE {_quoted(template)}"]
    for text in stop:
        lines.append(f"PARAMETER stop {_json_string(text)}")
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def _json_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def write_modelfile(path: str | os.PathLike, text: str) -> Path:
    """Write the Modelfile atomically."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def open_llama_cpp(path: str | os.PathLike, extra_buffers: bool = False, **kwargs):
    """A `llama_cpp.Llama` for the GGUF file `path` (llama-cpp-python; `kwargs` go to it, verbose off).

    `extra_buffers` False switches off llama.cpp's extra CPU buffer types (weights repacked at load for
    the CPU's AMX / int8 kernels, `use_extra_bufts`), which llama-cpp-python does not expose: every CPU
    then runs the same reference kernels. With llama-cpp-python 0.3.36 on a Xeon with AMX-INT8, a q8_0
    file (of any architecture, llama's too) crashes the process when a batch of several tokens runs
    through the repacked weights; without them it runs."""
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as lib
    except ImportError:
        raise UserError("running GGUF files needs llama-cpp-python: pip install llama-cpp-python") from None
    default = lib.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = extra_buffers
        return p

    lib.llama_model_default_params = params  # Llama() reads it once, while it loads the model
    try:
        return llama_cpp.Llama(model_path=str(path), **{"verbose": False, **kwargs})
    finally:
        lib.llama_model_default_params = default


def file_size(path: str | os.PathLike) -> str:
    """A file's size for a report line, e.g. "12.3 MB"."""
    size = Path(path).stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def progress(message: str) -> None:
    print(message, file=sys.stderr)
