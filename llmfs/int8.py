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

`--int8 dynamic` (opt-in, x86 CPUs): the same int8 weights, and each generated token's activations rounded
to integers as well, per token (`DynamicInt8Linear`; 7 bits, fbgemm's reduced range, which no x86 CPU can
overflow), so the product is integer x int8 in fbgemm, PyTorch's
int8 matrix library for x86 (`torch.ops.quantized.linear_dynamic`) -- what llama.cpp's q8_0 does (it rounds
activations per block of 32). It is faster because fbgemm's kernel is: the 56 matrices of eight
Qwen3-0.6B blocks take ~6 ms against ~12 ms for the weight-only kernel on the AMD EPYC measured. A row's
numbers never depend on the rows beside it, so a batched row equals its unbatched self: single-token rows (a
decoding step, each row of a batched step, a mixture-of-experts expert's tokens) go one row per call, rounded
with the row's own range (so a batched step of b rows reads the matrices b times: a server gains little from
batching with `--int8 dynamic`; scaling every row to a fixed range, as prompts do, would batch them but cost
~10% of a single stream's speed on the Qwen3 shapes); a prompt's tokens (several of one sequence at once) go in one call, each token
scaled to a fixed range first (`DynamicInt8Linear._prompt_product`), so a 16-token prompt reads the matrices
once instead of 16 times (Qwen3-0.6B shapes: ~90 ms against ~205 ms on the weight-only kernel). Rounding
the activations costs more accuracy than rounding the weights alone; the tests bound both. PyTorch 2.13
marks the quantized tensors this path packs its weights with as deprecated (pytorch/pytorch#184982): where
they are gone, `dynamic_kernel_available()` is False and `--int8 dynamic` is refused in one line.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmfs.errors import InvalidInput

INT8_MODES = ("weights", "dynamic")  # --int8 [MODE]: weight-only (the default), or weights and activations
KERNEL_DTYPE = torch.bfloat16  # the activations' dtype for the CPU kernel (its vectorized path)
QUANTIZE_BLOCK_ROWS = 4096  # rows quantized at a time (bounds the float temporaries)


def int8_kernel_available() -> bool:
    """True when this PyTorch has the int8 weight kernel (`torch._weight_int8pack_mm`)."""
    return hasattr(torch, "_weight_int8pack_mm")


def dynamic_kernel_available() -> bool:
    """True when this PyTorch has fbgemm's int8 x int8 kernels (x86 builds): what `--int8 dynamic` needs."""
    try:
        return ("fbgemm" in torch.backends.quantized.supported_engines
                and hasattr(torch, "_make_per_channel_quantized_tensor")
                and hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack"))
    except (AttributeError, RuntimeError):
        return False


def int8_mode(int8: bool | str | None) -> str | None:
    """The mode a command's or function's `int8` value means: None (float), "weights" or "dynamic"."""
    if int8 is None or int8 is False:
        return None
    mode = "weights" if int8 is True else int8
    if mode not in INT8_MODES:
        raise ValueError(f"int8 mode must be one of {INT8_MODES}, got {int8!r}")
    return mode


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

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        with torch.no_grad():
            self.kernel_scales.copy_(self.scales)  # not saved: it follows the loaded scales

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


class DynamicInt8Linear(Int8Linear):
    """`Int8Linear` whose single-token rows are multiplied int8 x int8 by fbgemm (`--int8 dynamic`): each
    row's activations are rounded to 8 bits with a scale and zero point of its own (fbgemm's dynamic
    quantization; 7-bit range, `REDUCE_RANGE`, so that CPUs without VNNI cannot saturate), the weights are
    `Int8Linear`'s, packed for fbgemm once (a second int8 copy). A prompt's tokens go in one call
    (`_prompt_product`); anything off the CPU takes `Int8Linear`'s path. Module docstring: why, and what it
    costs."""

    REDUCE_RANGE = True

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DynamicInt8Linear:
        if linear.weight.device.type != "cpu":
            raise InvalidInput("--int8 dynamic runs on the CPU of an x86 machine (fbgemm's int8 kernels), not on "
                               f"{linear.weight.device.type}; use --int8 (weight-only) instead")
        check_int8_options("dynamic")  # fbgemm missing: the commands' own line
        layer = super().from_linear(linear)
        layer.pack()
        return layer

    def pack(self) -> None:
        """(Re)build fbgemm's packed copy of the int8 weight (per-channel scales, zero points 0)."""
        with warnings.catch_warnings():  # PyTorch 2.13's deprecation notice (module docstring), once per layer
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight, self.scales.double(), torch.zeros_like(self.scales, dtype=torch.long), 0)
        engine = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "fbgemm"  # the packed weight keeps fbgemm's kernel whatever is set later
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        finally:
            torch.backends.quantized.engine = engine

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.pack()  # the packed copy follows the loaded weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32:
            rows = rows.float()
        product = torch.ops.quantized.linear_dynamic
        if x.dim() <= 2 or x.shape[-2] == 1:  # single-token rows: (in,), (rows, in) an expert's tokens, (b, 1, in)
            if rows.shape[0] == 1:  # a decoding step (the common case, kept short: ~200 calls per Qwen3 token)
                y = product(rows, self._packed, self.REDUCE_RANGE)
            else:  # one call per row: fbgemm rounds a call's input with one scale, so each row must be alone
                y = torch.cat([product(rows[i:i + 1], self._packed, self.REDUCE_RANGE) for i in range(rows.shape[0])])
        else:  # a prompt's tokens: one call for all (below)
            y = self._prompt_product(rows)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _prompt_product(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows @ W.T` for a prompt's tokens in ONE fbgemm call, each token still rounded on a grid of its own.

        Each row is divided by its largest |x| (so it lies in [-1, 1]) and two rows, all -1 and all +1, are
        appended: the call's range is then [-1, 1] whatever the rows are, so every token is rounded on the
        same grid relative to its own largest value (symmetric, 7 bits) and its numbers do not depend on
        the tokens beside it (a prompt's row equals the row alone, padded or batched with other prompts).
        Its product is multiplied back by that value. Per-row calls would read the whole matrix once per token, which is
        why a 16-token prompt is worth one call."""
        peak = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True)  # (rows, 1): largest |x|
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        grid = torch.empty(rows.shape[0] + 2, rows.shape[1])
        torch.div(rows, peak, out=grid[:-2])  # |x / peak| <= 1 exactly (division is correctly rounded)
        grid[-2].fill_(-1.0)
        grid[-1].fill_(1.0)
        return torch.ops.quantized.linear_dynamic(grid, self._packed, self.REDUCE_RANGE)[:-2] * peak


def _is_router(parent: nn.Module, name: str) -> bool:
    """A mixture-of-experts router: the `gate` of a module that picks top-k experts (`ch05.llama.qwen3`)."""
    return name == "gate" and hasattr(parent, "num_experts_per_tok")


def quantize_int8(model: nn.Module, mode: bool | str = "weights") -> nn.Module:
    """Replace each `nn.Linear` of `model` (except a mixture-of-experts router) by an `Int8Linear`
    (`mode` "weights" or True) or a `DynamicInt8Linear` ("dynamic"), in place, and return the model.
    See the module docstring for what stays float and why.

    Layers are swapped one at a time and each float weight is freed once replaced (a tied one lives on
    as the embedding); the C allocator keeps what was freed, so at the end it is asked to hand it back
    to the system (`release_freed_memory`): on Qwen3-0.6B shapes the resident memory drops from
    ~3.2 GB (float32 + int8) to ~1.5 GB (int8 + the float32 embedding)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("quantize_int8 needs the model's weights (some are on the meta device)")
    layer_class = DynamicInt8Linear if int8_mode(mode) == "dynamic" else Int8Linear
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not _is_router(parent, name):
                setattr(parent, name, layer_class.from_linear(child))
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
             "float32's bytes per weight, for faster CPU decoding; results close to float32. '--int8 dynamic' "
             "(x86 CPUs) also rounds each generated token's activations to integers (7 bits): faster still, a "
             "little less accurate (llmfs/int8.py)")


def add_int8_argument(p: argparse.ArgumentParser, dynamic: bool = False) -> None:
    """The generation commands' `--int8` switch; with `dynamic`, `--int8 [weights|dynamic]` (alone: weights)."""
    if not dynamic:
        p.add_argument("--int8", action="store_const", const="weights", default=False,
                       help=INT8_HELP.partition(". '--int8 dynamic'")[0] + " (llmfs/int8.py)")
        return
    p.add_argument("--int8", nargs="?", const="weights", default=False, choices=INT8_MODES, metavar="MODE",
                   help=INT8_HELP)


def int8_description(mode: bool | str | None) -> str:
    """What a model's description says about its int8 layers ("" for none)."""
    return {None: "", "weights": ", int8 weights",
            "dynamic": ", int8 weights and activations (dynamic)"}[int8_mode(mode)]


def check_int8_options(int8: bool | str | None, onednn: bool = False) -> None:
    """One line for a combination --int8 cannot serve (before anything loads)."""
    if int8_mode(int8) == "dynamic" and not dynamic_kernel_available():
        raise InvalidInput("--int8 dynamic needs fbgemm, PyTorch's int8 kernels for x86 CPUs, which this PyTorch "
                           "lacks; use --int8 (weight-only)")
    if int8 and onednn:
        raise InvalidInput("--int8 and --onednn do not combine: --onednn computes float32 linear layers with "
                           "oneDNN, --int8 replaces them by int8 ones; choose one")
