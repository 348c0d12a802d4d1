"""Weight-only int8 inference: each linear layer's weights stored as int8, a quarter of float32's bytes.

Why: a cached decoding step multiplies ONE token's vector by every weight matrix of the model,
so its time goes to reading the weights from memory (`llmfs.decoding_layout`). Stored as int8
(one byte per weight, plus one scale per output row) the same matrices are read 4x faster than
float32 and 2x faster than bfloat16, if the product reads the int8 bytes directly.

- Quantization is symmetric and per output channel: row i of W becomes
  `q_i = round(W_i / s_i)` with `s_i = max|W_i| / 127`, so `W_i ~ q_i * s_i`; the rounding error of a
  weight is at most s_i / 2 (0.4% of its row's largest weight). Activations stay floating point.
- The product `x @ W.T = (x @ q.T) * s` runs in PyTorch's own CPU kernel
  `torch._weight_int8pack_mm(x, q, s)`, which reads q as int8 (no new dependency). In torch 2.13
  its bfloat16 path is vectorized and its float32 path is not: measured for one token on a shared
  2-core Xeon (one thread, the matrix in cache), a 3072 x 1024 matrix takes ~0.3 ms with bfloat16
  activations, ~2 ms with float32 ones, ~0.8 ms as a float32 `nn.Linear` (whole models, read from
  memory: `python -m benchmarks.int8_decode`). So `Int8Linear` hands the kernel
  bfloat16 activations and scales (`KERNEL_DTYPE`) and returns the result in x's dtype: a float32
  model computes its linear layers from bfloat16-rounded inputs, the rest (attention, norms,
  softmax, residual stream) in float32. The kernel gave wrong numbers for inner dimensions that
  are not a multiple of 16 in that path, so it is used only for multiples of 32 (`kernel_usable`).
- Elsewhere (CUDA, MPS, a build without the kernel, odd tiny shapes) the fallback is
  dequantize-then-matmul: `F.linear(x, q.to(x.dtype)) * s`, the same numbers in x's dtype.

`quantize_int8(model)` swaps every `nn.Linear` of a model for an `Int8Linear`, in place:
GPT-2 (`ch04.gpt.GPTModel`), Llama 3, Qwen3 (dense and each MoE expert) and Gemma 3
(`ch05.llama`), the output head included. Two things stay float, on purpose:

- The token embedding. A lookup reads one row per token, so its bytes cost no decoding time.
  With tied weights (GPT-2, Gemma 3, small Qwen3) the head gets its own int8 copy of the shared
  matrix: the head reads ALL of it every token (it is the largest matrix of a small model:
  151,936 x 1,024 in Qwen3-0.6B, 26% of its weights), so that is where int8 pays; the float
  table stays for the lookup. The model then holds the matrix twice (float + a quarter of it).
- A mixture-of-experts router (`gate`, the linear layer beside the experts): it is tiny
  (emb_dim x num_experts) and its top-k choice is discrete, so a rounding error could send a
  token to another expert.

With `llmfs.decoding_layout`: quantize first, lay out after. `layout_for_decoding` only touches
float32 `nn.Linear` weights (the router, whatever was skipped); an `Int8Linear` stores its int8
matrix [out, in] contiguous, which is what the kernel reads, whatever the strides of the float
weight it came from (so a model loaded with `decoding_layout=True` quantizes to the same numbers).

The generation commands take `--int8` (`add_int8_argument`); training does not (an int8 weight
has no gradient).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmfs.errors import InvalidInput

KERNEL_DTYPE = torch.bfloat16  # the activations' dtype for the CPU kernel (its vectorized path)
QUANTIZE_BLOCK_ROWS = 4096  # rows quantized at a time (bounds the float temporaries)


def int8_kernel_available() -> bool:
    """True when this PyTorch has the int8 weight kernel (`torch._weight_int8pack_mm`)."""
    return hasattr(torch, "_weight_int8pack_mm")


def kernel_usable(weight: torch.Tensor) -> bool:
    """Whether the CPU kernel runs this int8 weight (out, in): on the CPU, inner size a multiple of 32."""
    return int8_kernel_available() and weight.device.type == "cpu" and weight.shape[1] % 32 == 0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): int8 (out, in), contiguous, and float32 (out,), with weight ~ q * scales[:, None].

    Symmetric per output row: the row's largest |weight| becomes +-127. A row of zeros gets scale 1
    (and q = 0), so nothing divides by zero. Done in blocks of rows, so the float temporaries stay
    small (a whole-matrix `w / scales` of Qwen3-0.6B's head would be another 622 MB)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_BLOCK_ROWS):
        w = weight.detach()[start:start + QUANTIZE_BLOCK_ROWS].float()  # (rows, in)
        s = w.abs().amax(dim=1) / 127.0  # (rows,)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start:start + QUANTIZE_BLOCK_ROWS] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scales[start:start + QUANTIZE_BLOCK_ROWS] = s
    return q, scales


class Int8Linear(nn.Module):
    """`nn.Linear`'s product with int8 weights (buffer `weight`, (out, in)) and one float scale per
    output channel (buffer `scales`, (out,)); the bias stays a float parameter.

    Built from a trained layer with `Int8Linear.from_linear(linear)`. Inference only: the int8
    weight is a buffer, not a parameter, so nothing trains it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        # The kernel's copy of the scales (it wants them in the activations' dtype); not saved.
        self.register_buffer("kernel_scales", torch.ones(out_features, dtype=KERNEL_DTYPE, device=device),
                             persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 version of `linear` (same device; scales and bias in its weight's dtype)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        q, scales = quantize_weight(weight)
        with torch.no_grad():
            layer.weight.copy_(q)
            layer.scales.copy_(scales)
            layer.kernel_scales.copy_(scales)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_usable(self.weight):
            x2d = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (b * num_tokens, in)
            y = torch._weight_int8pack_mm(x2d, self.weight, self.kernel_scales)  # (b * num_tokens, out)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:  # dequantize-then-matmul: (x @ q.T) * s, in x's dtype
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _is_router(parent: nn.Module, name: str) -> bool:
    """A mixture-of-experts router: the `gate` of a module that picks top-k experts (`ch05.llama.qwen3`)."""
    return name == "gate" and hasattr(parent, "num_experts_per_tok")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace each `nn.Linear` of `model` (except a mixture-of-experts router) by an `Int8Linear`,
    in place, and return the model. See the module docstring for what stays float and why.

    Layers are swapped one at a time and each float weight is freed once replaced (a tied one lives on
    as the embedding); the C allocator keeps what was freed, so at the end it is asked to hand it back
    to the system (`release_freed_memory`): on Qwen3-0.6B shapes the resident memory drops from
    ~3.2 GB (float32 + int8) to ~1.5 GB (int8 + the float32 embedding)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("quantize_int8 needs the model's weights (some are on the meta device)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not _is_router(parent, name):
                setattr(parent, name, Int8Linear.from_linear(child))
    release_freed_memory()
    return model


def release_freed_memory() -> bool:
    """Ask glibc to return freed heap memory to the system (`malloc_trim`); False where there is none."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's int8 layers hold (int8 weights and their scales)."""
    return sum(m.weight.numel() + m.scales.numel() * m.scales.element_size()
               for m in model.modules() if isinstance(m, Int8Linear))


# --- The commands' switch ----------------------------------------------------------------------

INT8_HELP = ("store the linear layers' weights as int8 with one scale per output channel: a quarter of "
             "float32's bytes per weight, for faster CPU decoding; results close to float32 (llmfs/int8.py)")


def add_int8_argument(p: argparse.ArgumentParser) -> None:
    """The generation commands' `--int8` switch."""
    p.add_argument("--int8", action="store_true", help=INT8_HELP)


def check_int8_options(int8: bool, onednn: bool = False) -> None:
    """One line for a combination --int8 cannot serve (before anything loads)."""
    if int8 and onednn:
        raise InvalidInput("--int8 and --onednn do not combine: --onednn computes float32 linear layers with "
                           "oneDNN, --int8 replaces them by int8 ones; choose one")
