"""Chapter 7 bonus: export a model to GGUF, llama.cpp's and Ollama's file format.

    python -m ch07.export_gguf --model outputs/ch07/quick-sft.pth                 # an instruction-tuned model
    python -m ch07.export_gguf --model gpt2 --outtype q8_0 --output gpt2-q8_0.gguf
    python -m ch07.export_gguf --model outputs/ch05/model.pth --outtype f32
    python -m ch07.export_gguf --model path/to/Llama-3.2-1B-Instruct             # a Hugging Face folder
    ollama create my-model -f outputs/ch07/quick-sft-f16.Modelfile             # then: ollama run my-model

Every model the project's chat layer loads (`ch07.cli.load_chat_model`: GPT-2's weights, chapter-5
checkpoints and model files, chapter-7 instruction-tuned models; in Python also a model with appendix E's
LoRA adapters, merged first) becomes a file of llama.cpp's `gpt2` architecture with GPT-2's tokenizer,
plus a Modelfile beside it with the chapter's Alpaca prompt as its TEMPLATE. Hugging Face Llama 3 and
Qwen3 folders (chapter 5's bonus models) become llama.cpp's `llama` / `qwen3` files with their own
tokenizer.json and chat format (`export_hf_folder`). Our `GPTModel` is GPT-2,
so the export is a renaming: `gpt_gguf_tensors` says which tensor becomes which, the one real change
being the separate query, key and value projections joined into one `attn_qkv` matrix. The file
itself is written by `llmfs.gguf_export` (needs the `gguf` package).

This file imports chapter 7 (the prompt format and the model loader), chapter 5 (the Llama 3 / Qwen3
readers), chapter 2 (the tokenizer) and appendix E (LoRA merging), so it lives in chapter 7's folder.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from appendix_e.lora import LinearWithLoRA, merge_lora
from ch02.tokenizer import END_OF_TEXT, GPT2_RANKS_FILE
from ch07.cli import PROMPT_FORMAT, load_chat_model
from llmfs.chat import default_model_name
from llmfs.cli import Parser, check_input_file, path_argument, run
from llmfs.errors import InvalidInput
from llmfs.gguf_export import (
    OUTTYPES,
    GGUFVocab,
    bpe_vocab_from_ranks,
    bpe_vocab_from_tokenizer_json,
    check_output_file,
    file_size,
    gguf_module,
    modelfile_path,
    modelfile_text,
    write_gguf,
    write_modelfile,
)
from llmfs.runtime import outputs_dir

GPT2_VOCAB_SIZE = 50257  # GPT-2's tokenizer: 50,256 BPE tokens and <|endoftext|>
END_OF_TEXT_ID = 50256
LAYER_NORM_EPS = 1e-5    # ch04.gpt.LayerNorm's default, GPT-2's

# The line that starts the next instruction in each chapter-7 prompt style: where an answer must stop.
NEXT_TURN = {"alpaca": "### Instruction:", "phi3": "<|user|>"}


# --- The tokenizer --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def gpt2_gguf_vocab() -> GGUFVocab:
    """GPT-2's tokenizer as a GGUF file stores it: the 50,257 tokens of the bundled `ch02/gpt2.tiktoken`
    in GPT-2's printable byte form, the 50,000 merges recovered from the ranks, <|endoftext|> (50256)
    as the control token that begins and ends a text."""
    import tiktoken.load

    from ch02.bpe.bpe import bytes_to_unicode

    ranks = tiktoken.load.load_tiktoken_bpe(str(GPT2_RANKS_FILE))
    return bpe_vocab_from_ranks(ranks, {END_OF_TEXT: END_OF_TEXT_ID}, bytes_to_unicode(), eos_id=END_OF_TEXT_ID)


# --- Our GPTModel as llama.cpp's gpt2 architecture --------------------------------------------------------

def check_exportable(model: nn.Module) -> dict:
    """The model's config, after checking that llama.cpp's gpt2 graph computes what it computes: a
    language-model head over GPT-2's 50,257 tokens (the file carries GPT-2's tokenizer; a classifier's
    head or a grown vocabulary does not fit it). Raises InvalidInput otherwise."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, dict) or not hasattr(model, "trf_blocks"):
        raise InvalidInput(f"{type(model).__name__} is not a chapter-4 GPTModel; only GPTModel exports to gpt2")
    if cfg["vocab_size"] != GPT2_VOCAB_SIZE:
        raise InvalidInput(f"the model's vocabulary has {cfg['vocab_size']:,} tokens; the GGUF file carries "
                           f"GPT-2's tokenizer of {GPT2_VOCAB_SIZE:,}, so only models with that vocabulary export")
    head = model.out_head.weight.shape
    if tuple(head) != (GPT2_VOCAB_SIZE, cfg["emb_dim"]):
        raise InvalidInput(f"the model's output head is {tuple(head)}, not ({GPT2_VOCAB_SIZE}, {cfg['emb_dim']}): "
                           "a classifier (chapter 6) predicts classes, not tokens, and cannot run as a GGUF text model")
    return cfg


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def gpt_gguf_tensors(model: nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every tensor llama.cpp's gpt2 graph reads, from our GPTModel's weights.

    nn.Linear keeps its weight as [out, in]; GGUF lists a matrix's dimensions the other way round
    ([in, out], fastest first), which is the same memory, so no weight is transposed. (The Hugging Face
    GPT-2 files store [in, out] in `Conv1D`, which is why llama.cpp's converter transposes them.)
    """
    cfg = check_exportable(model)
    emb_dim = cfg["emb_dim"]
    yield "token_embd.weight", _array(model.tok_emb.weight)         # (vocab_size, emb_dim)
    yield "position_embd.weight", _array(model.pos_emb.weight)      # (context_length, emb_dim)
    for i, block in enumerate(model.trf_blocks):
        att = block.att
        # llama.cpp's gpt2 block reads one fused projection: rows 0..E-1 queries, E..2E-1 keys, then values.
        qkv = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight], dim=0)  # (3 * emb_dim, emb_dim)
        if att.W_query.bias is not None:
            qkv_bias = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
        else:  # qkv_bias=False (the chapters' default): llama.cpp's gpt2 requires the bias, zeros change nothing
            qkv_bias = torch.zeros(3 * emb_dim)
        yield f"blk.{i}.attn_norm.weight", _array(block.norm1.scale)
        yield f"blk.{i}.attn_norm.bias", _array(block.norm1.shift)
        yield f"blk.{i}.attn_qkv.weight", _array(qkv)
        yield f"blk.{i}.attn_qkv.bias", _array(qkv_bias)
        yield f"blk.{i}.attn_output.weight", _array(att.out_proj.weight)
        yield f"blk.{i}.attn_output.bias", _array(att.out_proj.bias)
        yield f"blk.{i}.ffn_norm.weight", _array(block.norm2.scale)
        yield f"blk.{i}.ffn_norm.bias", _array(block.norm2.shift)
        up, down = block.ff.layers[0], block.ff.layers[2]           # Linear(E, 4E), GELU, Linear(4E, E)
        yield f"blk.{i}.ffn_up.weight", _array(up.weight)
        yield f"blk.{i}.ffn_up.bias", _array(up.bias)
        yield f"blk.{i}.ffn_down.weight", _array(down.weight)
        yield f"blk.{i}.ffn_down.bias", _array(down.bias)
    yield "output_norm.weight", _array(model.final_norm.scale)
    yield "output_norm.bias", _array(model.final_norm.shift)
    if model.out_head.weight is not model.tok_emb.weight:  # tied (GPT-2's weights): llama.cpp reuses token_embd
        yield "output.weight", _array(model.out_head.weight)        # (vocab_size, emb_dim)


def gpt_gguf_metadata(cfg: dict) -> dict[str, int | float]:
    """The hyperparameters llama.cpp's gpt2 architecture reads (its gguf-py `Keys.LLM` names)."""
    keys = gguf_module().Keys
    arch = "gpt2"
    return {keys.LLM.CONTEXT_LENGTH.format(arch=arch): cfg["context_length"],
            keys.LLM.EMBEDDING_LENGTH.format(arch=arch): cfg["emb_dim"],
            keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch): 4 * cfg["emb_dim"],
            keys.LLM.BLOCK_COUNT.format(arch=arch): cfg["n_layers"],
            keys.Attention.HEAD_COUNT.format(arch=arch): cfg["n_heads"],
            keys.Attention.LAYERNORM_EPS.format(arch=arch): LAYER_NORM_EPS}


# --- The prompt format for Ollama -------------------------------------------------------------------------

def ollama_template(style: str | None) -> str:
    """The prompt TEMPLATE in Ollama's syntax: a system message first (as `llmfs.chat` writes it), then for an
    instruction-tuned model chapter 7's prompt around `{{ .Prompt }}`; a base model continues the text."""
    system = "{{ if .System }}{{ .System }}\n\n{{ end }}"
    if style is None:
        return system + "{{ .Prompt }}"
    entry = {"instruction": "{{ .Prompt }}", "input": "", "output": "{{ .Response }}"}
    return system + PROMPT_FORMAT.format_input(entry, style) + PROMPT_FORMAT.format_response(entry, style)


def stop_strings(style: str | None) -> list[str]:
    """Where an answer ends: GPT-2's <|endoftext|> and, for an instruction-tuned model, the next instruction."""
    return [END_OF_TEXT] + ([NEXT_TURN[style]] if style in NEXT_TURN else [])


# --- The export -----------------------------------------------------------------------------------------

def merged_copy(model: nn.Module) -> nn.Module:
    """The model itself, or, when it holds appendix E's LoRA adapters, a copy with them merged into plain
    linear layers (W + alpha * (A @ B).T): GGUF has no place for adapters."""
    if not any(isinstance(m, LinearWithLoRA) for m in model.modules()):
        return model
    return merge_lora(copy.deepcopy(model))


def export_gguf(model: nn.Module, path: str | os.PathLike, outtype: str = "f16", style: str | None = None,
                name: str | None = None, overwrite: bool = False, source: str | None = None) -> tuple[Path, Path]:
    """Write `model` (a GPTModel, LoRA adapters merged) to the GGUF file `path` and its Modelfile beside it
    (`<name>.Modelfile`); returns both paths. `style` is the chapter-7 prompt style of an
    instruction-tuned model ("alpaca", "phi3") or None for a base model."""
    if style is not None and style not in NEXT_TURN:
        raise InvalidInput(f"unknown prompt style {style!r}; choose one of {', '.join(NEXT_TURN)} or None")
    model = merged_copy(model)
    cfg = check_exportable(model)
    path = check_output_file(path, overwrite)
    modelfile = modelfile_path(path)
    if modelfile.exists() and not overwrite:
        raise FileExistsError(f"{modelfile} already exists; pass --overwrite to replace it")
    template = ollama_template(style)  # before writing: a bad template is refused with nothing written
    write_gguf(path, "gpt2", gpt_gguf_metadata(cfg), gpt_gguf_tensors(model), gpt2_gguf_vocab(), outtype=outtype,
               name=name or path.stem, overwrite=overwrite)
    comment = (f"Made by python -m ch07.export_gguf from {source or 'a GPTModel'} ({outtype}).\n"
               f"Import with: ollama create {path.stem.lower()} -f {modelfile.name}")
    write_modelfile(modelfile, modelfile_text(path.name, template, stop_strings(style),
                                              {"num_ctx": cfg["context_length"]}, comment=comment))
    return path, modelfile


# --- Hugging Face Llama 3 and Qwen3 folders (chapter 5's bonus models) ------------------------------------

# Hugging Face tensor names -> llama.cpp's, per block after "model.layers.{i}." (the same for both families).
HF_BLOCK_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                  "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                  "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
                  "self_attn.k_norm.weight": "attn_k_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                  "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                  "mlp.down_proj.weight": "ffn_down.weight"}
HF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
# llama.cpp's architecture, pre-tokenizer and chat-format tokenizer class for each config.json model_type.
HF_FAMILIES = {"llama": ("llama", "llama-bpe"), "qwen3": ("qwen3", "qwen2")}


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Llama q_proj / k_proj weight for llama.cpp's rotary embedding.

    Hugging Face's Llama rotates the two halves of each head ([x0..x_{d/2-1}] with [x_{d/2}..]: chapter 5's
    `apply_rope`); llama.cpp's llama graph rotates neighbouring pairs (x0 with x1, x2 with x3, ...), as Meta's
    original checkpoints did. Interleaving each head's two halves makes both compute the same attention
    scores (llama.cpp's converter does the same). Qwen3 needs none: llama.cpp runs it with the halves."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: dict) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp reads it, one divisor per frequency (`rope_freqs.weight`):
    1 for the high frequencies, `factor` for the low ones, a smooth blend between (chapter 5's
    `compute_rope_params` divides the frequencies by the same numbers)."""
    freq = cfg["rope_freq"]
    inv_freq = 1.0 / cfg["rope_base"] ** (torch.arange(0, cfg["head_dim"], 2, dtype=torch.float64) / cfg["head_dim"])
    wavelen = 2 * torch.pi / inv_freq
    old = freq["original_context_length"]
    smooth = (old / wavelen - freq["low_freq_factor"]) / (freq["high_freq_factor"] - freq["low_freq_factor"])
    factors = 1 / ((1 - smooth) / freq["factor"] + smooth)
    factors = torch.where(wavelen < old / freq["high_freq_factor"], torch.ones_like(factors), factors)
    factors = torch.where(wavelen > old / freq["low_freq_factor"], torch.full_like(factors, freq["factor"]), factors)
    return factors.float()


def hf_family_config(model_dir: Path) -> tuple[str, dict, dict]:
    """(model_type, our config, config.json) of a Hugging Face Llama 3 / Qwen3 folder, checked by chapter 5's
    readers; another family is refused in one line."""
    from ch05.llama.llama3 import config_from_hf, read_hf_config
    from ch05.llama.qwen3 import qwen3_config_from_hf

    hf = read_hf_config(model_dir)
    kind = hf.get("model_type")
    if kind not in HF_FAMILIES:
        raise InvalidInput(f"{model_dir}/config.json describes a {kind!r} model; GGUF export reads GPT-2 models "
                           f"and Hugging Face {' and '.join(HF_FAMILIES)} folders")
    source = f"{model_dir}/config.json"
    cfg = config_from_hf(hf, source) if kind == "llama" else qwen3_config_from_hf(hf, source)
    return kind, cfg, hf


def hf_gguf_tensors(model_dir: Path, kind: str, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) for each tensor of the folder's safetensors, renamed (and for Llama, its q/k rows
    reordered); a tied output head is left out (llama.cpp reuses token_embd, as the model does)."""
    from safetensors import safe_open

    from ch05.llama.llama3 import safetensors_files

    if kind == "llama" and "rope_freq" in cfg:
        yield "rope_freqs.weight", _array(llama3_rope_factors(cfg))
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name == "lm_head.weight" and cfg["tie_weights"]:
                    continue
                w = f.get_tensor(name)
                if name in HF_TOP_NAMES:
                    yield HF_TOP_NAMES[name], _array(w)
                    continue
                parts = name.split(".", 3)  # model, layers, i, rest
                if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in HF_BLOCK_NAMES:
                    raise InvalidInput(f"{file}: tensor {name} has no place in llama.cpp's {kind} architecture")
                if kind == "llama" and parts[3] == "self_attn.q_proj.weight":
                    w = permute_for_llama_cpp(w, cfg["n_heads"])
                elif kind == "llama" and parts[3] == "self_attn.k_proj.weight":
                    w = permute_for_llama_cpp(w, cfg["n_kv_groups"])
                yield f"blk.{parts[2]}.{HF_BLOCK_NAMES[parts[3]]}", _array(w)


def hf_gguf_metadata(arch: str, cfg: dict) -> dict[str, int | float]:
    """The hyperparameters of llama.cpp's llama / qwen3 architectures (gguf-py `Keys` names)."""
    keys = gguf_module().Keys
    return {keys.LLM.CONTEXT_LENGTH.format(arch=arch): cfg["context_length"],
            keys.LLM.EMBEDDING_LENGTH.format(arch=arch): cfg["emb_dim"],
            keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch): cfg["hidden_dim"],
            keys.LLM.BLOCK_COUNT.format(arch=arch): cfg["n_layers"],
            keys.LLM.VOCAB_SIZE.format(arch=arch): cfg["vocab_size"],
            keys.Attention.HEAD_COUNT.format(arch=arch): cfg["n_heads"],
            keys.Attention.HEAD_COUNT_KV.format(arch=arch): cfg["n_kv_groups"],
            keys.Attention.KEY_LENGTH.format(arch=arch): cfg["head_dim"],
            keys.Attention.VALUE_LENGTH.format(arch=arch): cfg["head_dim"],
            keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch): float(cfg["norm_eps"]),
            keys.Rope.DIMENSION_COUNT.format(arch=arch): cfg["head_dim"],
            keys.Rope.FREQ_BASE.format(arch=arch): float(cfg["rope_base"])}


def hf_chat_format(kind: str) -> tuple[type, str]:
    """Chapter 5's tokenizer class of the family (its `chat_prompt`, `stop_tokens`) and its begin token."""
    from ch05.llama.llama3 import Llama3Tokenizer
    from ch05.llama.qwen3 import Qwen3Tokenizer

    return (Llama3Tokenizer, Llama3Tokenizer.bos) if kind == "llama" else (Qwen3Tokenizer, "")


def hf_ollama_template(kind: str) -> str:
    """The family's chat format (chapter 5's `chat_prompt`) in Ollama's syntax, the system turn optional. The
    begin token is left out: llama.cpp adds it to every text (add_bos)."""
    tokenizer, bos = hf_chat_format(kind)
    plain = tokenizer.chat_prompt("{{ .Prompt }}").removeprefix(bos)
    with_system = tokenizer.chat_prompt("{{ .Prompt }}", system="{{ .System }}").removeprefix(bos)
    system = with_system[:len(with_system) - len(plain)]
    return "{{ if .System }}" + system + "{{ end }}" + plain


def export_hf_folder(model_dir: str | os.PathLike, path: str | os.PathLike, outtype: str = "f16",
                     name: str | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a Hugging Face Llama 3 or Qwen3 folder (config.json, safetensors, tokenizer.json) as GGUF of
    llama.cpp's llama / qwen3 architecture, with a Modelfile in the family's chat format; returns both paths."""
    model_dir = Path(model_dir)
    kind, cfg, hf = hf_family_config(model_dir)
    arch, pre = HF_FAMILIES[kind]
    path = check_output_file(path, overwrite)
    modelfile = modelfile_path(path)
    if modelfile.exists() and not overwrite:
        raise FileExistsError(f"{modelfile} already exists; pass --overwrite to replace it")
    tokenizer, bos = hf_chat_format(kind)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    vocab = bpe_vocab_from_tokenizer_json(model_dir / "tokenizer.json", cfg["vocab_size"], pre,
                                          bos=bos or None, eos=tokenizer.stop_tokens[0], add_bos=bool(bos))
    write_gguf(path, arch, hf_gguf_metadata(arch, cfg), hf_gguf_tensors(model_dir, kind, cfg), vocab,
               outtype=outtype, name=name or path.stem, overwrite=overwrite)
    comment = (f"Made by python -m ch07.export_gguf from {model_dir} ({kind}, {outtype}).\n"
               f"Import with: ollama create {path.stem.lower()} -f {modelfile.name}")
    write_modelfile(modelfile, modelfile_text(path.name, hf_ollama_template(kind), tokenizer.stop_tokens,
                                              {"num_ctx": min(cfg["context_length"], 8192)}, comment=comment))
    return path, modelfile


def is_hf_family_folder(spec: str | os.PathLike) -> bool:
    """A local folder whose config.json names a model_type other than GPT-2's (those take the HF route)."""
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError):
        return False
    return kind not in (None, "gpt2")


# --- python -m ch07.export_gguf -----------------------------------------------------------------------------

def parser() -> Parser:
    p = Parser(prog="python -m ch07.export_gguf",
               description="Write a model as a GGUF file (llama.cpp, Ollama) with an Ollama Modelfile beside it.")
    p.add_argument("--model", required=True,
                   help="a chapter-7 instruction-tuned model (.pth with its .json), a chapter-5 model.pth / "
                        "checkpoint.pth or folder, a Hugging Face GPT-2 folder or file, a GPT-2 name (gpt2, ...), "
                        "or a Hugging Face Llama 3 / Qwen3 folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--output", type=path_argument, default=None,
                   help="the .gguf file (default: outputs/ch07/<model name>-<outtype>.gguf); the Modelfile "
                        "goes beside it as <name>.Modelfile")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="tensor type: f32, f16 (default) or q8_0 (8-bit blocks, about half of f16); "
                        "1-D tensors stay f32")
    p.add_argument("--style", choices=("auto", "none", *NEXT_TURN), default="auto",
                   help="the Modelfile's prompt template: auto (the style saved with an instruction-tuned model, "
                        "none for others), alpaca, phi3 or none (plain text continuation)")
    p.add_argument("--overwrite", "--force", action="store_true", help="replace an existing .gguf and Modelfile")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def work() -> None:
        base_name = default_model_name(args.model).removesuffix(":latest")
        output = args.output or outputs_dir("ch07") / f"{base_name}-{args.outtype}.gguf"
        # Checks first: the output, then the model (it must load and fit gpt2 and GPT-2's tokenizer).
        output = check_output_file(output, args.overwrite)
        if modelfile_path(output).exists() and not args.overwrite:
            raise FileExistsError(f"{modelfile_path(output)} already exists; pass --overwrite to replace it")
        gguf_module()
        if is_hf_family_folder(args.model):  # a Llama 3 / Qwen3 folder (chapter 5's bonus models)
            if args.style != "auto":
                raise InvalidInput("--style applies to GPT-2 models; a Llama 3 / Qwen3 folder gets its family's "
                                   "chat format")
            gguf_path, modelfile = export_hf_folder(Path(args.model).expanduser(), output, args.outtype,
                                                    name=base_name, overwrite=args.overwrite)
        else:
            if Path(args.model).expanduser().is_file():
                check_input_file(args.model, "--model")
            chat = load_chat_model(args.model, device="cpu", style=None if args.style == "none" else args.style)
            check_exportable(chat.model)
            gguf_path, modelfile = export_gguf(chat.model, output, args.outtype, style=chat.style, name=base_name,
                                               overwrite=args.overwrite, source=chat.description)
        print(f"wrote {gguf_path} ({file_size(gguf_path)}, {args.outtype}) and {modelfile}")
        print(f"try it: ollama create {base_name} -f {modelfile}")

    return run(work, argv)
