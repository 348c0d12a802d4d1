"""Float32 linear layers on the CPU through oneDNN: the same products, computed faster.

Why: PyTorch hands a float32 `nn.Linear` on the CPU to its BLAS library (oneMKL in the
pip wheels). Measured on the 2-core AMD EPYC benchmark machine (torch 2.13), oneMKL runs
the output head's product (512 tokens x 768 -> 50,257) at ~120 GFLOP/s, while oneDNN,
the other matrix library inside every x86 PyTorch wheel, runs it at ~175 and the
transformer blocks' products 5-25% faster. A chapter-5 training step of GPT-2 124M goes
from 2.7 s to 2.4 s. PyTorch has no public switch for this (oneDNN takes float32 products
only when asked to round them to bfloat16/TF32, which changes the numbers), so:

- `LinearOneDNN` is an autograd Function: the forward product and the input gradient go
  through `torch.ops.mkldnn._linear_pointwise` (the op PyTorch's own compiler emits for
  CPU linear layers); the weight gradient stays a plain matmul, where oneMKL is as fast.
- `onednn_linear()` is a context manager. Inside it a `TorchFunctionMode` sends every
  float32 CPU `F.linear` call, which is what each `nn.Linear` makes, to that Function.
  The chapter code keeps the book's `nn.Linear`; parameters, state dicts and
  checkpoints are unchanged.

Generation gains most. A cached decoding step multiplies ONE token vector by every
weight matrix, which is bound by memory speed, and oneMKL does those matrix-vector
products on one core (~13 GB/s on that machine, whatever the thread count) while oneDNN
uses all of them (~21 GB/s): GPT-2 124M goes from ~37 to ~27 ms per token. Without
autograd (`torch.no_grad`, `torch.inference_mode`) the mode calls the op directly,
skipping the autograd Function's bookkeeping.

It is a pure speed choice: results agree with the default path to float32 rounding
(~1e-6 relative). It is used only where it was checked to work (`onednn_linear_supported`):
an x86 CPU whose PyTorch has the op and computes the same numbers with it. It is opt-in:
the chapter scripts enter it around the whole run with `--onednn` (`ch05.cli.run`), because
it is faster on the AMD EPYC measured here and slower on an Intel Xeon (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llmfs.errors import InvalidInput


def _product(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2d @ weight.T + bias by oneDNN (weight may be a transposed view).

    The op is looked up here, not at import: builds without oneDNN lack it."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for any number of leading dimensions, by oneDNN."""
    return _product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class LinearOneDNN(torch.autograd.Function):
    """`F.linear(x, weight, bias)` with oneDNN doing the forward product and the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dL/dx = dL/dy @ W
            grad_x = _product(grad_2d, weight.t(), None).view(x.shape)
        if ctx.needs_input_grad[1]:  # dL/dW = dL/dy^T @ x (oneMKL is as fast as oneDNN here)
            grad_w = grad_2d.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch < 2.4 has a separate function for the CPU
        return torch.is_autocast_cpu_enabled()


def _routable(x, weight, bias) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                for t in tensors)
            and x.dim() >= 1 and weight.dim() == 2
            # Under autocast, linear layers already run in bfloat16 through oneDNN.
            and not _cpu_autocast_enabled())


def _linear_args(input, weight, bias=None):  # F.linear's signature, to read its arguments by name
    return input, weight, bias


class _LinearToOneDNN(TorchFunctionMode):
    def __init__(self, min_rows: int = 1):
        super().__init__()
        self.min_rows = min_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_args(*args, **kwargs)
            if _routable(x, weight, bias) and x.numel() >= self.min_rows * x.shape[-1]:
                # Without autograd (generation, evaluation) the op is called directly.
                return LinearOneDNN.apply(x, weight, bias) if torch.is_grad_enabled() else _linear(x, weight, bias)
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def onednn_linear_supported() -> bool:
    """True on an x86 CPU whose PyTorch has the oneDNN op and gets the same numbers from it."""
    if platform.machine().lower() not in {"x86_64", "amd64", "x64"}:
        return False  # on ARM (Apple silicon, ...) PyTorch's oneDNN build is not the fast path
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((5, 3, 16), (24, 16), (24,)))
        got = LinearOneDNN.apply(x, w, b)
        return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def check_onednn(onednn: bool) -> None:
    """One line, before any work, where `--onednn` is asked of a benchmark this machine cannot run it on
    (the chapter commands instead leave their `--onednn` a no-op there, as the module docstring says)."""
    if onednn and not onednn_linear_supported():
        raise InvalidInput("--onednn needs an x86 CPU whose PyTorch computes linear layers with oneDNN; this one "
                           "does not (run without --onednn)")


def onednn_linear(enabled: bool = True, min_rows: int = 1):
    """Context manager: inside it, float32 CPU linear layers run through oneDNN (see module docstring).

    `min_rows`: only products of at least that many rows (tokens) are routed; the server's batched steps
    use 2, so that a single row stays on the default path, faster for one row on the AMD EPYC measured.
    A no-op when `enabled` is False, where `onednn_linear_supported()` is False, or when
    entered under CPU autocast (nothing would be routed; the mode would only add overhead).
    """
    if not (enabled and onednn_linear_supported()) or _cpu_autocast_enabled():
        return contextlib.nullcontext()
    return _LinearToOneDNN(min_rows)
