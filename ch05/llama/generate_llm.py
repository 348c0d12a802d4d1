"""Chapter 5 bonus: one command to generate text with every model family the project runs.

    python -m ch05.llama --model Qwen/Qwen3-0.6B --prompt "Why is the sky blue?" --chat
    python -m ch05.llama --model path/to/Llama-3.2-1B-Instruct --prompt "Hi" --chat --dtype bfloat16
    python -m ch05.llama --model gpt2 --prompt "Every effort moves you" --max-new-tokens 30
    python -m ch05.llama --model outputs/ch05/checkpoint.pth --prompt "Every effort moves you"

`--model` is a Hugging Face model folder (Llama 3.x, Qwen3, Qwen3-MoE, Gemma 3 text or GPT-2; config.json,
safetensors, tokenizer.json), a Hub id (downloaded through `huggingface_hub`; HF_ENDPOINT and
HF_HUB_OFFLINE apply), a GPT-2 name, or a chapter-5 checkpoint. The family comes from
config.json's `model_type`. Text runs through chapter 5's `generate` (KV cache on by default),
which stops at the end-of-turn token in chat mode (end-of-text otherwise). Bad input (options, a
folder's config.json, a prompt too long) is a one-line `error:` and exit code 2 (`llmfs.cli.run`),
found before the weights load where it can be.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ch05.gpt_generate import generate, load_model_for_generation
from ch05.llama.gemma3 import Gemma3Tokenizer, gemma3_config_from_hf, load_gemma3
from ch05.llama.llama3 import Llama3Tokenizer, config_from_hf, load_llama3, read_hf_config, resolve_model_dir
from ch05.llama.qwen3 import Qwen3Tokenizer, load_qwen3, qwen3_config_from_hf
from llmfs.cli import Parser, add_sampling_arguments, device_name, non_negative_int, run, whole_number
from llmfs.decoding_layout import layout_for_decoding
from llmfs.errors import InvalidInput
from llmfs.int8 import add_int8_argument, check_int8_options, int8_description, quantize_int8
from llmfs.sampling import check_sampling_args

# config.json's model_type -> (loader, tokenizer class)
FAMILIES = {
    "llama": (load_llama3, Llama3Tokenizer),
    "qwen3": (load_qwen3, Qwen3Tokenizer),
    "qwen3_moe": (load_qwen3, Qwen3Tokenizer),
    "gemma3_text": (load_gemma3, Gemma3Tokenizer),
}
# ... and how each reads config.json: run on it before anything else, so that a folder's bad config fails at once.
CONFIG_READERS = {"llama": config_from_hf, "qwen3": qwen3_config_from_hf, "qwen3_moe": qwen3_config_from_hf,
                  "gemma3_text": gemma3_config_from_hf}
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


class GPT2Tokenizer:
    """Chapter 2's offline GPT-2 tokenizer behind the same small interface as `Llama3Tokenizer`."""

    stop_tokens = ("<|endoftext|>",)

    def __init__(self):
        from ch02.tokenizer import get_gpt2_tokenizer

        self.enc = get_gpt2_tokenizer()

    def token_id(self, token: str) -> int | None:
        return self.enc.eot_token if token == "<|endoftext|>" else None

    @property
    def stop_ids(self) -> set[int]:
        return {self.enc.eot_token}

    def encode(self, text: str, chat: bool = False, **chat_options) -> list[int]:
        if chat:
            raise InvalidInput("GPT-2 models have no chat format; drop --chat (chapter 7 fine-tunes one to follow "
                               "instructions)")
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i != self.enc.eot_token]
        return self.enc.decode(list(ids))


@dataclass
class LoadedLLM:
    model: nn.Module
    tokenizer: object  # Llama3Tokenizer, Qwen3Tokenizer, Gemma3Tokenizer or GPT2Tokenizer
    family: str
    description: str


def _gpt_family(spec: str | os.PathLike, dtype: torch.dtype | None, device, decoding_layout: bool,
                context_length: int | None = None, int8: bool | str = False) -> LoadedLLM:
    if context_length is not None:  # nothing to shorten: said rather than ignored
        raise InvalidInput(f"--context-length shortens the RoPE tables of Llama and Qwen3 models; {spec} is a GPT "
                           "model, whose positions are learned (leave the option out)")
    model, described = load_model_for_generation(spec, device=device)
    if dtype is not None:
        model = model.to(dtype)
    if int8:  # New: int8 linear layers (llmfs.int8), before the layout (which then skips them)
        quantize_int8(model, int8)
        described += int8_description(int8)
    if decoding_layout:
        layout_for_decoding(model)
    return LoadedLLM(model, GPT2Tokenizer(), "gpt2", described)


def _hf_folder(model_dir: Path, dtype: torch.dtype | None, device, context_length: int | None,
               decoding_layout: bool, int8: bool | str = False) -> LoadedLLM:
    hf = read_hf_config(model_dir)
    family = hf.get("model_type")
    if family == "gpt2" or (family is None and "emb_dim" in hf):  # Hugging Face GPT-2, or our chapter-5 folder
        return _gpt_family(model_dir, dtype, device, decoding_layout, context_length, int8)
    if family == "gemma3":  # the multimodal Gemma 3 (4B and up): its text model sits under text_config
        raise InvalidInput(f"{model_dir}/config.json describes a multimodal 'gemma3' model; this command runs the "
                           "text-only Gemma 3 folders (model_type 'gemma3_text', such as google/gemma-3-1b-it)")
    if family not in FAMILIES:
        raise InvalidInput(f"{model_dir}/config.json describes a {family!r} model; this command runs "
                           f"{', '.join(sorted(FAMILIES))} and gpt2")
    CONFIG_READERS[family](hf, f"{model_dir}/config.json")  # InvalidInput naming what does not fit
    loader, tokenizer_cls = FAMILIES[family]
    tokenizer = tokenizer_cls(model_dir)  # a missing tokenizer.json fails here, before the weights load
    model = loader(model_dir, dtype=dtype, device=device, context_length=context_length,
                   decoding_layout=decoding_layout)
    n_params = sum(p.numel() for p in model.parameters())
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    if int8:  # New: int8 linear layers (llmfs.int8); the layout above then only applies to what stays float
        quantize_int8(model, int8)
        dtype_name += int8_description(int8)
    return LoadedLLM(model, tokenizer, family,
                     f"{family} from {model_dir} ({n_params / 1e6:,.1f}M parameters, {dtype_name})")


def load_llm(spec: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             context_length: int | None = None, decoding_layout: bool = True, int8: bool | str = False) -> LoadedLLM:
    """Model, tokenizer and family for what `--model` names (see the module docstring).

    `decoding_layout` stores float32 linear weights for faster CPU decoding (llmfs.decoding_layout);
    `int8` stores the linear layers' weights as int8 (llmfs.int8)."""
    from ch05.gpt_download import canonical_model_name

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_folder(path, dtype, device, context_length, decoding_layout, int8)
    if path.exists():  # our checkpoint file, or a folder holding one
        return _gpt_family(path, dtype, device, decoding_layout, context_length, int8)
    try:
        canonical_model_name(str(spec))
        return _gpt_family(str(spec), dtype, device, decoding_layout, context_length, int8)  # a GPT-2 name
    except ValueError:
        pass
    return _hf_folder(resolve_model_dir(spec), dtype, device, context_length, decoding_layout, int8)  # a Hub id


def generate_text(llm: LoadedLLM, prompt: str, max_new_tokens: int = 100, chat: bool = False,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  use_cache: bool = True, seed: int = 123, **chat_options) -> tuple[str, list[int]]:
    """The generated text (without the prompt) and its token ids, stopped at the end token."""
    tok = llm.tokenizer
    ids = tok.encode(prompt, chat=chat, **chat_options)
    context = llm.model.cfg["context_length"]
    if not ids:
        raise InvalidInput("the prompt is empty: give the model some text to continue")
    if len(ids) >= context:
        raise InvalidInput(f"the prompt is {len(ids)} tokens but the model's context holds {context} "
                           "(prompt and at least one new token); shorten it")
    # End-of-turn in a chat, end-of-text otherwise; any stop token cuts the text.
    end_id = tok.token_id(tok.stop_tokens[0] if chat else tok.stop_tokens[-1])
    device = next(llm.model.parameters()).device
    idx = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(llm.model, idx, max_new_tokens=max_new_tokens, context_size=context, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=end_id, use_cache=use_cache, generator=generator)
    new = out[0, len(ids):].tolist()
    stops = [i for i, t in enumerate(new) if t in tok.stop_ids]
    new = new[:stops[0]] if stops else new
    return tok.decode(new), new


def parser() -> Parser:
    p = Parser(prog="python -m ch05.llama",
               description="Generate text with Llama 3, Qwen3 (dense or MoE), Gemma 3, GPT-2 or a chapter-5 "
                           "checkpoint.")
    p.add_argument("--model", required=True,
                   help="a Hugging Face model folder or Hub id (Llama 3.x, Qwen3, Qwen3-MoE, Gemma 3 text, GPT-2), a GPT-2 name "
                        "(gpt2, 124M, ...), or checkpoint.pth / model.pth from ch05.gpt_train")
    p.add_argument("--prompt", required=True, help="text to continue, or the user's message with --chat")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the family's chat format")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--think", action="store_true", help="Qwen3 chat: let the model reason in <think> first")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=100,
                   help="answer length cap in tokens (default 100)")
    add_sampling_arguments(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="weights' dtype: auto keeps the file's (no copy); bfloat16 halves float32 weights")
    p.add_argument("--context-length", type=whole_number(2), default=None,
                   help="use a shorter context than the model's (smaller RoPE tables)")
    p.add_argument("--no-cache", action="store_true", help="recompute all tokens each step (no KV cache)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    add_int8_argument(p, dynamic=True)
    return p


def main(argv: list[str] | None = None) -> int:
    """Print the generated text; returns the exit code (2, with a one-line message, for bad input)."""
    from llmfs.runtime import get_device

    p = parser()
    args = p.parse_args(argv)
    if (args.system or args.think) and not args.chat:
        p.error("--system and --think only apply with --chat")

    def generate_and_print() -> None:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        check_int8_options(args.int8)
        device = get_device(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            llm = load_llm(args.model, dtype=DTYPES[args.dtype], device=device, context_length=args.context_length,
                           int8=args.int8)
        options = {}
        if args.system:
            options["system"] = args.system
        if args.think:
            if llm.family not in ("qwen3", "qwen3_moe"):
                raise InvalidInput(f"--think is for Qwen3 models; this is a {llm.family} model")
            options["thinking"] = True
        print(f"model: {llm.description}; device: {device}", file=sys.stderr)
        text, _ = generate_text(llm, args.prompt, args.max_new_tokens, chat=args.chat,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                use_cache=not args.no_cache, seed=args.seed, **options)
        print(text if args.chat else args.prompt + text)

    return run(generate_and_print, argv)


if __name__ == "__main__":
    sys.exit(main())
