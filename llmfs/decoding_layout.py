"""Lay float32 linear weights out for CPU decoding: the same numbers, a faster order in memory.

One cached decoding step multiplies a single token's vector by every weight matrix of the model,
so its time goes to reading the weights from memory. `nn.Linear` keeps its weight as [out, in] and
computes `x @ W.T`; PyTorch's CPU BLAS (oneMKL) streams a float32 weight faster for one row when
the same matrix lies in memory the other way round, [in, out], which is how Hugging Face's GPT-2
stores its block weights. On this project's AMD EPYC: 15-19 vs 13-16 GB/s, and GPT-2 124M decodes
~1.2x faster (`benchmarks/README.md`). bfloat16 weights are left alone (there the stored order is
the faster one), as are weights on other devices.

Nothing about the model changes but the strides: each weight keeps its shape, values, parameter
object (so tied weights stay tied), `state_dict` key and autograd behaviour, and the chapter code
runs as it is. The generation commands (`ch05.cli` generate, `ch05.llama.generate_llm`, `llmfs.chat` and
`ch07.serve`, the web apps) call it once after loading; the training loops don't (their weights
change every step). `LLMFS_DECODING_LAYOUT=0` switches it off, to compare on another CPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

DECODING_LAYOUT_ENV = "LLMFS_DECODING_LAYOUT"


def decoding_layout_enabled() -> bool:
    """False when the environment variable LLMFS_DECODING_LAYOUT is "0" (listed in
    `llmfs.runtime.environment_variables`, and named by the commands when set)."""
    return os.environ.get(DECODING_LAYOUT_ENV, "1").strip() != "0"


def laid_out_for_decoding(weight: torch.Tensor) -> torch.Tensor:
    """`weight` with the same shape and values, stored [in, out] in memory if that is faster here."""
    if (decoding_layout_enabled() and weight.dim() == 2 and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and weight.is_contiguous()):
        return weight.t().contiguous().t()
    return weight


def layout_for_decoding(model: nn.Module) -> nn.Module:
    """Store each float32 CPU `nn.Linear` weight transposed in memory (its shape is unchanged).

    Returns the same model, changed in place. Saving it works as before: `torch.save` keeps the
    strides, and `llmfs.checkpoint.save_model` writes .safetensors (which stores tensors contiguously)
    in the standard layout. (safetensors' own `save_model`/`save_file` refuse such a model.)
    (Loading a Hugging Face folder can lay the weights out as it reads them, which keeps the peak
    memory near the weights' size: `ch05.llama.llama3.load_hf_weights(..., decoding_layout=True)`.)"""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                # A tied weight is one Parameter: changed once, then no longer contiguous.
                module.weight.data = laid_out_for_decoding(module.weight.detach())
    return model
