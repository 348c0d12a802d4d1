"""Chapter 5, section 5.5: OpenAI's pretrained GPT-2 weights in our GPTModel, without TensorFlow.

OpenAI published GPT-2 as TensorFlow checkpoints. The same weights are on the
Hugging Face Hub as `model.safetensors` files (repositories openai-community/gpt2,
-medium, -large, -xl), a plain tensor format that loads without TensorFlow and
without unpickling anything. This module downloads such a file with
`huggingface_hub` (cache, resumed downloads, progress bar, the HF_ENDPOINT mirror
and HF_HUB_OFFLINE settings all come from there; `llmfs.download.from_hub` bounds its
waits), or reads one you already have, and copies every tensor into the matching place
of chapter 4's `GPTModel`.

The mapping, for block i (Hugging Face name -> our name):

    wte.weight                      -> tok_emb.weight (out_head.weight shares it: GPT-2 ties them)
    wpe.weight                      -> pos_emb.weight
    h.i.ln_1.weight / .bias         -> trf_blocks.i.norm1.scale / .shift
    h.i.attn.c_attn.weight / .bias  -> trf_blocks.i.att.W_query / W_key / W_value (split in three)
    h.i.attn.c_proj.weight / .bias  -> trf_blocks.i.att.out_proj
    h.i.ln_2.weight / .bias         -> trf_blocks.i.norm2.scale / .shift
    h.i.mlp.c_fc.weight / .bias     -> trf_blocks.i.ff.layers[0]
    h.i.mlp.c_proj.weight / .bias   -> trf_blocks.i.ff.layers[2]
    ln_f.weight / .bias             -> final_norm.scale / .shift

GPT-2's linear layers are "Conv1D" modules that store the weight as (in, out),
the transpose of `nn.Linear`'s (out, in), so those weights are transposed.

The book's names work too: `settings, params = download_and_load_gpt2("124M", "gpt2")` gives
OpenAI's settings and nested params (from the same safetensors files), which
`load_weights_into_gpt(gpt, params)` and `assign` accept as in listing 5.5.

    python -m ch05.gpt_download gpt2      # fetch once into the Hugging Face cache
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ch04.gpt import GPT2_SIZES, GPT_CONFIG_124M, GPTModel
from llmfs.download import HubUnavailable, from_hub
from llmfs.errors import InvalidInput, PretrainedWeightsUnavailable  # noqa: F401  (raised here; imported from here too)

GPT2_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# The book names the sizes by parameter count ("124M", ...) and, in chapters 6-7, "gpt2-small (124M)".
BOOK_SIZE_ALIASES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl",
                     "gpt2-small": "gpt2"}
HF_ORGANIZATION = "openai-community"
WEIGHTS_FILE = "model.safetensors"


def _unavailable_message(what: str, cause: object) -> str:
    """One line: what is missing, why, and the ways to get it (a command prints it as its `error:` line)."""
    return (
        f"GPT-2 weights {what} are not available: {cause}. Ways to get them: with internet access they download "
        "automatically (about 0.5 GB for gpt2), and behind a firewall HF_ENDPOINT names a Hugging Face mirror, "
        "e.g. HF_ENDPOINT=https://hf-mirror.com; offline, fetch them once on a connected machine "
        "(`python -m ch05.gpt_download gpt2`), copy its Hugging Face cache (HF_HOME, default ~/.cache/huggingface) "
        "and set HF_HUB_OFFLINE=1 to use only that cache; or pass a local path: a folder with model.safetensors "
        "(and config.json), or a .safetensors file"
    )


def canonical_model_name(name: str) -> str:
    """'gpt2', 'gpt2-medium', ..., also '124M', 'gpt2-small (124M)' or 'openai-community/gpt2' -> 'gpt2'."""
    key = name.strip()
    if key.startswith(f"{HF_ORGANIZATION}/"):
        key = key.split("/", 1)[1]
    if m := re.search(r"\((\d+[mM])\)", key):  # "gpt2-medium (355M)"
        key = m.group(1)
    if re.fullmatch(r"\d+[mM]", key):
        key = key.upper()
    key = BOOK_SIZE_ALIASES.get(key, key)
    if key not in GPT2_MODEL_NAMES:
        aliases = ", ".join(k for k in BOOK_SIZE_ALIASES if k[0].isdigit())
        raise InvalidInput(f"unknown GPT-2 model {name!r}; choose one of {', '.join(GPT2_MODEL_NAMES)} "
                         f"(or the book's sizes {aliases}), or pass a local path")
    return key


def gpt2_config(model_name: str = "gpt2", **overrides) -> dict:
    """GPTModel config of an OpenAI GPT-2 size: full 1024-token context, biased Q/K/V, tied output head."""
    name = canonical_model_name(model_name)
    return {**GPT_CONFIG_124M, **GPT2_SIZES[name], "context_length": 1024, "qkv_bias": True,
            "tie_weights": True, **overrides}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def download_gpt2_safetensors(model_name: str = "gpt2", cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of `model.safetensors` for a GPT-2 size, downloaded into the Hugging Face cache if needed.

    Honours HF_ENDPOINT (a mirror) and HF_HUB_OFFLINE=1 (cache only), read when called. No wait
    lasts longer than `llmfs.download.NETWORK_WAIT_S` without data (`llmfs.download.from_hub`);
    when the endpoint cannot be reached or stalls, the local cache is still used.
    Raises PretrainedWeightsUnavailable when the file is neither reachable nor cached.
    """
    with warnings.catch_warnings():
        # huggingface_hub imports tqdm.auto, which warns in notebooks that lack ipywidgets.
        warnings.filterwarnings("ignore", message="IProgress not found")
        import huggingface_hub

    name = canonical_model_name(model_name)
    repo_id = f"{HF_ORGANIZATION}/{name}"
    try:
        path = from_hub(huggingface_hub.hf_hub_download, _endpoint(), _offline(), repo_id=repo_id,
                        filename=WEIGHTS_FILE, cache_dir=cache_dir)
    except HubUnavailable as exc:
        raise PretrainedWeightsUnavailable(_unavailable_message(f"{name!r} ({repo_id})", exc)) from exc
    return Path(path)


def _config_from_hf_json(path: Path) -> dict:
    """GPTModel config from a Hugging Face GPT-2 config.json (n_embd, n_layer, n_head, n_positions).

    A file that is not JSON, or lacks a size, raises CheckpointFileError naming it."""
    from ch04.gpt import REQUIRED_KEYS
    from llmfs.checkpoint import CheckpointFileError, check_model_config, read_config_json

    hf = read_config_json(path, "Hugging Face config")
    missing = [k for k in ("vocab_size", "n_embd", "n_head", "n_layer") if k not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        missing.append("n_positions")
    if missing:
        raise CheckpointFileError(f"{path} lacks {missing}: not a Hugging Face GPT-2 config.json")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise InvalidInput(f"{path} describes a {hf['model_type']!r} model; only GPT-2 checkpoints can be loaded")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise InvalidInput(f"{path}: activation_function {act!r} differs from GPT-2's tanh-approximated GELU")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise InvalidInput(f"{path}: layer_norm_epsilon {eps} differs from the 1e-5 our LayerNorm uses")
    cfg = {**GPT_CONFIG_124M, "vocab_size": hf["vocab_size"],
           "context_length": hf.get("n_positions", hf.get("n_ctx")), "emb_dim": hf["n_embd"],
           "n_heads": hf["n_head"], "n_layers": hf["n_layer"], "qkv_bias": True, "tie_weights": True}
    return check_model_config(cfg, str(path), REQUIRED_KEYS)


def _strip_prefix(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel.save_pretrained writes 'transformer.h.0...', the hub files 'h.0...'."""
    return {k.removeprefix("transformer."): v for k, v in params.items()}


def _config_from_params(params: dict[str, torch.Tensor]) -> dict:
    """Config from tensor shapes alone (no config.json): the head count is the one guess."""
    params = _strip_prefix(params)
    for key in ("wte.weight", "wpe.weight"):
        if key not in params:
            raise InvalidInput(f"not a GPT-2 checkpoint: tensor {key!r} is missing")
    vocab_size, emb_dim = params["wte.weight"].shape
    layers = {int(m.group(1)) for k in params if (m := re.match(r"h\.(\d+)\.", k))}
    by_width = {size["emb_dim"]: size["n_heads"] for size in GPT2_SIZES.values()}
    if emb_dim in by_width:
        n_heads = by_width[emb_dim]
    elif emb_dim % 64 == 0:
        n_heads = emb_dim // 64  # every GPT-2 size uses 64-dimensional heads
        warnings.warn(f"no config.json: assuming {n_heads} heads of 64 dimensions for n_embd {emb_dim}",
                      stacklevel=3)
    else:
        raise InvalidInput(f"no config.json next to the weights and n_embd {emb_dim} is no GPT-2 size: "
                         "the number of attention heads is unknown; put the config.json beside the file")
    return {**GPT_CONFIG_124M, "vocab_size": int(vocab_size), "context_length": int(params["wpe.weight"].shape[0]),
            "emb_dim": int(emb_dim), "n_heads": n_heads, "n_layers": max(layers) + 1 if layers else 0,
            "qkv_bias": True, "tie_weights": True}


def _looks_like_path(name_or_path: str) -> bool:
    return any(sep in name_or_path for sep in ("/", "\\")) or name_or_path.endswith(".safetensors") \
        or name_or_path.startswith(".")


def load_gpt2_params(name_or_path: str | os.PathLike = "gpt2",
                     cache_dir: str | os.PathLike | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a GPT-2 checkpoint.

    `name_or_path`: a GPT-2 name ("gpt2", ..., or "124M", ...), downloaded or taken from the
    cache; a local folder holding model.safetensors (config.json, when present, gives the
    config); or a .safetensors file (config.json beside it is used when present).
    """
    text = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        weights = path / WEIGHTS_FILE if path.is_dir() else path
        if not weights.is_file():
            raise PretrainedWeightsUnavailable(_unavailable_message(
                f"in {path}", f"the folder has no {WEIGHTS_FILE} (save a GPT2LMHeadModel with "
                "save_pretrained, which writes safetensors)"))
        params = _read_safetensors(weights)
        config_json = weights.parent / "config.json"
        cfg = _config_from_hf_json(config_json) if config_json.is_file() else _config_from_params(params)
        return cfg, params
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise PretrainedWeightsUnavailable(_unavailable_message(f"at {text}", "no such file or folder"))
    name = canonical_model_name(text)
    weights = download_gpt2_safetensors(name, cache_dir=cache_dir)
    return gpt2_config(name), _read_safetensors(weights)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a damaged or foreign file raises CheckpointFileError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmfs.checkpoint import CheckpointFileError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointFileError(f"{path} is not a readable .safetensors file ({exc})") from None


# Buffers some GPT-2 files carry (the causal mask); GPTModel builds its own.
_IGNORED = re.compile(r"(^|\.)attn\.(masked_)?bias$|^lm_head\.weight$")


def load_weights_into_gpt(gpt: GPTModel, params: dict) -> GPTModel:
    """Copy GPT-2 weights into `gpt` in place, and tie its output head to the token embedding.

    `params` is either Hugging Face's flat dict of tensors ("h.0.attn.c_attn.weight", ...) or
    the book's nested dict from `download_and_load_gpt2` (listing 5.5's input). Every tensor is
    checked before anything is copied: a missing, surplus or wrongly shaped tensor raises
    ValueError naming it (with both shapes), and the model is left untouched.
    """
    params = book_params_to_hf(params) if "blocks" in params else _strip_prefix(params)
    used: set[str] = set()
    # (destination parameter, source tensor already in nn.Linear layout, source name)
    plan: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []

    def fetch(name: str) -> torch.Tensor:
        if name not in params:
            raise InvalidInput(f"tensor {name!r} is missing from the GPT-2 checkpoint "
                             f"(does the model have more layers than the file? n_layers={len(gpt.trf_blocks)})")
        used.add(name)
        return params[name]

    def expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dest: str) -> torch.Tensor:
        if tuple(tensor.shape) != tuple(shape):
            raise InvalidInput(f"tensor {name!r} has shape {tuple(tensor.shape)} but the model's {dest} needs "
                             f"{tuple(shape)}: the checkpoint and the model config disagree")
        return tensor

    def schedule(dest_name: str, dest: torch.Tensor | None, tensor: torch.Tensor, source: str) -> None:
        if dest is None:
            raise InvalidInput(f"the checkpoint has {source!r} but the model has no {dest_name} "
                             "(GPT-2 uses biases in the query/key/value projections: set qkv_bias=True)")
        plan.append((dest_name, dest, tensor, source))

    def linear(prefix: str, module: nn.Linear, dest_name: str) -> None:
        """A Conv1D (in, out) weight and its bias into nn.Linear (out, in)."""
        w = expect(f"{prefix}.weight", fetch(f"{prefix}.weight"), tuple(module.weight.shape[::-1]),
                   f"{dest_name}.weight (transposed)")
        schedule(f"{dest_name}.weight", module.weight, w.T, f"{prefix}.weight")
        b = expect(f"{prefix}.bias", fetch(f"{prefix}.bias"), tuple(module.bias.shape), f"{dest_name}.bias")
        schedule(f"{dest_name}.bias", module.bias, b, f"{prefix}.bias")

    def norm(prefix: str, module, dest_name: str) -> None:
        for src, attr in (("weight", "scale"), ("bias", "shift")):
            param = getattr(module, attr)
            t = expect(f"{prefix}.{src}", fetch(f"{prefix}.{src}"), tuple(param.shape), f"{dest_name}.{attr}")
            schedule(f"{dest_name}.{attr}", param, t, f"{prefix}.{src}")

    schedule("tok_emb.weight", gpt.tok_emb.weight,
           expect("wte.weight", fetch("wte.weight"), tuple(gpt.tok_emb.weight.shape), "tok_emb.weight"),
           "wte.weight")
    schedule("pos_emb.weight", gpt.pos_emb.weight,
           expect("wpe.weight", fetch("wpe.weight"), tuple(gpt.pos_emb.weight.shape), "pos_emb.weight"),
           "wpe.weight")
    for i, block in enumerate(gpt.trf_blocks):
        h, ours = f"h.{i}", f"trf_blocks.{i}"
        att = block.att
        emb = att.W_query.in_features
        # c_attn packs query, key and value side by side: weight (emb, 3*emb), bias (3*emb,).
        w = expect(f"{h}.attn.c_attn.weight", fetch(f"{h}.attn.c_attn.weight"), (emb, 3 * att.d_out),
                   f"{ours}.att.W_query/W_key/W_value weights (transposed, side by side)")
        b = expect(f"{h}.attn.c_attn.bias", fetch(f"{h}.attn.c_attn.bias"), (3 * att.d_out,),
                   f"{ours}.att.W_query/W_key/W_value biases")
        for part, w_part, b_part in zip(("W_query", "W_key", "W_value"), w.chunk(3, dim=1), b.chunk(3, dim=0)):
            layer = getattr(att, part)
            schedule(f"{ours}.att.{part}.weight", layer.weight, w_part.T, f"{h}.attn.c_attn.weight")
            schedule(f"{ours}.att.{part}.bias", layer.bias, b_part, f"{h}.attn.c_attn.bias")
        linear(f"{h}.attn.c_proj", att.out_proj, f"{ours}.att.out_proj")
        norm(f"{h}.ln_1", block.norm1, f"{ours}.norm1")
        norm(f"{h}.ln_2", block.norm2, f"{ours}.norm2")
        linear(f"{h}.mlp.c_fc", block.ff.layers[0], f"{ours}.ff.layers.0")
        linear(f"{h}.mlp.c_proj", block.ff.layers[2], f"{ours}.ff.layers.2")
    norm("ln_f", gpt.final_norm, "final_norm")

    surplus = sorted(k for k in params if k not in used and not _IGNORED.search(k))
    if surplus:
        raise InvalidInput(f"the GPT-2 checkpoint has tensors the model has no place for: {surplus[:8]}"
                         f"{' ...' if len(surplus) > 8 else ''} (does the file have more layers than "
                         f"n_layers={len(gpt.trf_blocks)}?)")

    gpt.tie_weights()  # out_head.weight becomes tok_emb.weight itself, as in GPT-2
    with torch.no_grad():
        for _, dest, tensor, _ in plan:
            dest.copy_(tensor)  # copy_ converts dtype and device as needed
    gpt.cfg["tie_weights"] = True
    return gpt


def load_pretrained_gpt2(name_or_path: str | os.PathLike = "gpt2", drop_rate: float = 0.0,
                         device: torch.device | str | None = None,
                         cache_dir: str | os.PathLike | None = None) -> GPTModel:
    """A GPTModel holding OpenAI's GPT-2 weights (or a local GPT-2 checkpoint), in eval mode.

    `device` defaults to the CPU. Raises PretrainedWeightsUnavailable when the weights
    can be neither downloaded nor found.
    """
    cfg, params = load_gpt2_params(name_or_path, cache_dir=cache_dir)
    cfg = {**cfg, "drop_rate": drop_rate}
    model = GPTModel(cfg)
    load_weights_into_gpt(model, params)
    return model.to(device if device is not None else "cpu").eval()


# --- The book's names: download_and_load_gpt2, its nested params, assign ---------------------------

BOOK_MODEL_SIZES = ("124M", "355M", "774M", "1558M")
# Per block, the modules whose weight/bias the book nests as params["blocks"][i][part][part]["w" or "g"/"b"].
_BLOCK_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2")


def _book_key(module: str, param: str) -> str:
    """OpenAI's leaf names: "w"/"b" for the linear layers, "g" (gain)/"b" for the layer norms."""
    return "b" if param == "bias" else ("g" if module.startswith("ln") else "w")


def hf_params_to_book(params: dict[str, torch.Tensor]) -> dict:
    """Hugging Face GPT-2 tensors in the book's nested layout, as float32 NumPy arrays."""
    params = _strip_prefix(params)
    n_layer = len({m.group(1) for k in params if (m := re.match(r"h\.(\d+)\.", k))})

    def array(name: str):
        if name not in params:
            raise InvalidInput(f"tensor {name!r} is missing from the GPT-2 checkpoint")
        return params[name].detach().to("cpu", torch.float32).numpy()

    book = {"wte": array("wte.weight"), "wpe": array("wpe.weight"), "blocks": [],
            "g": array("ln_f.weight"), "b": array("ln_f.bias")}
    for i in range(n_layer):
        block: dict = {}
        for module in _BLOCK_MODULES:
            node = block
            for part in module.split("."):
                node = node.setdefault(part, {})
            for param in ("weight", "bias"):
                node[_book_key(module, param)] = array(f"h.{i}.{module}.{param}")
        book["blocks"].append(block)
    return book


def book_params_to_hf(params: dict) -> dict[str, torch.Tensor]:
    """The book's nested params back to Hugging Face's flat names (both store Conv1D weights as (in, out))."""
    def tensor(node, *path: str) -> torch.Tensor:
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise InvalidInput(f"the GPT-2 params have no {'/'.join(path)!r} (expected the layout of "
                                 "download_and_load_gpt2)")
            node = node[key]
        return torch.as_tensor(node)

    flat = {"wte.weight": tensor(params, "wte"), "wpe.weight": tensor(params, "wpe"),
            "ln_f.weight": tensor(params, "g"), "ln_f.bias": tensor(params, "b")}
    for i, block in enumerate(params["blocks"]):
        for module in _BLOCK_MODULES:
            for param in ("weight", "bias"):
                flat[f"h.{i}.{module}.{param}"] = tensor(block, *module.split("."), _book_key(module, param))
    return flat


def download_and_load_gpt2(model_size: str, models_dir: str | os.PathLike) -> tuple[dict, dict]:
    """The book's call in section 5.5: `settings, params = download_and_load_gpt2("124M", "gpt2")`.

    Returns OpenAI's hyperparameters (n_vocab, n_ctx, n_embd, n_head, n_layer) and the weights
    in the book's nested layout (params["wte"], params["blocks"][i]["attn"]["c_attn"]["w"], ...,
    params["g"], params["b"]) as NumPy arrays, for `load_weights_into_gpt(gpt, params)`.
    The weights come from Hugging Face's safetensors files, so TensorFlow is not needed:
    `models_dir/model_size` is used when it holds a model.safetensors (e.g. written by
    save_pretrained); otherwise the file is taken from, or downloaded into, the Hugging Face
    cache that `load_pretrained_gpt2` shares.
    """
    if model_size not in BOOK_MODEL_SIZES:
        raise ValueError(f"Model size not in {BOOK_MODEL_SIZES}")
    local = Path(models_dir) / model_size
    cfg, flat = load_gpt2_params(local if (local / WEIGHTS_FILE).is_file() else model_size)
    settings = {"n_vocab": cfg["vocab_size"], "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"],
                "n_head": cfg["n_heads"], "n_layer": cfg["n_layers"]}
    return settings, hf_params_to_book(flat)


def assign(left: torch.Tensor, right) -> nn.Parameter:
    """The book's helper for listing 5.5: `right` (NumPy array or tensor) as a new Parameter of
    `left`'s dtype and device, after checking the shapes match, e.g.
    `gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])`."""
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    return nn.Parameter(torch.as_tensor(right).detach().to(left.device, left.dtype, copy=True))


if __name__ == "__main__":
    from ch05.cli import download_main  # the command line lives with the other chapter-5 CLIs

    sys.exit(download_main())
