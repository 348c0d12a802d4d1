"""Chapter 5 bonus: training-speed tricks, applied one at a time to the chapter's training step.

The book repository lists PyTorch performance tricks for the chapter-5 training loop; our `GPTModel`
(ch04/gpt.py) already uses most of them by default (marked `# New:` there). To measure each one, this
module rebuilds the book's starting point and adds the tricks back one by one:

- `BookLayerNorm` and `BookGELU`: the book's chapter-4 listings as the book prints them (mean/variance
  LayerNorm, the written-out tanh GELU), which our model replaced by `F.layer_norm` / `F.gelu`;
- `build_model(cfg, tricks)`: a chapter-4 `GPTModel` (imported, never copied) for a set of trick names,
  by config keys (`use_sdpa`, `tie_weights`) and by swapping the book's modules back in;
- `make_optimizer_for(model, tricks)`: the book's `torch.optim.AdamW` or the fused kernel;
- `train_step`: one optimizer step on chapter 5's `calc_loss_batch`, optionally under bfloat16 autocast;
- `LADDER` / `rung_tricks`: the cumulative ladder, and `measure` / `measure_in_fresh_process`, which time
  a few steps of one rung (the allocator setting is made at start-up, so a rung runs in a fresh process).

Used by ch05/training_speed/training-speed.ipynb and `python -m benchmarks.training_speed`.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

from ch04.gpt import GPTModel
from ch05.gpt_train import calc_loss_batch
from llmfs.bench import proc_status_mib
from llmfs.runtime import cpu_bf16_supported
from llmfs.trainer import autocast_context

# The tricks, in the ladder's order (each rung adds one to the rungs before it). torch.compile comes
# last: it is the one trick with a start-up cost (compiling takes seconds to minutes), it changes no
# number the model computes, and compiled last it compiles once, for the final shape and precision.
TRICKS = ("fused_adamw", "sdpa", "fused_norm_gelu", "tied_weights", "bf16", "keep_freed_memory", "larger_batch",
          "compile")
# (rung name, the trick it adds); rung 0 is the book's setup.
LADDER = (
    ("book", None),
    ("+ fused AdamW", "fused_adamw"),
    ("+ SDPA attention", "sdpa"),
    ("+ fused LayerNorm/GELU", "fused_norm_gelu"),
    ("+ tied weights", "tied_weights"),
    ("+ bf16 autocast", "bf16"),
    ("+ keep freed memory", "keep_freed_memory"),
    ("+ larger batch", "larger_batch"),
    ("+ torch.compile", "compile"),
)
# |loss(rung) - loss(rung 0)| allowed with the same weights, dropout off: float32 rungs differ only by
# rounding (another order of additions); bf16 rounds every product's inputs to 8 significant bits.
ATOL_FP32, ATOL_BF16 = 1e-4, 5e-2
LARGER_BATCH_FACTOR = 4  # "larger_batch": 4x the batch (2 -> 8 sequences at the benchmark's shape)


class BookLayerNorm(nn.Module):
    """The book's `LayerNorm` (section 4.2) as the book prints it: mean, biased variance, normalise,
    scale and shift, four separate tensor operations (our ch04 `LayerNorm` runs them as one kernel)."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class BookGELU(nn.Module):
    """The book's `GELU` (section 4.3) as the book prints it: GPT-2's tanh approximation written out,
    about eight elementwise operations, each a pass over memory (ours: one `F.gelu(approximate="tanh")`)."""

    def __init__(self):
        super().__init__()

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(
            torch.sqrt(torch.tensor(2.0 / torch.pi)) *
            (x + 0.044715 * torch.pow(x, 3))
        ))


def use_book_norm_and_gelu(model: GPTModel) -> GPTModel:
    """Put the book's LayerNorm and GELU back into a `GPTModel`, in place.

    The replacements have the same parameters under the same names (`scale`, `shift`; GELU has none),
    so the state dict, and the weights drawn under a seed, stay those of the model as built.
    """
    emb_dim = model.cfg["emb_dim"]
    for block in model.trf_blocks:
        for name in ("norm1", "norm2"):
            book = BookLayerNorm(emb_dim)
            book.load_state_dict(getattr(block, name).state_dict())
            setattr(block, name, book)
        block.ff.layers[1] = BookGELU()  # layers: Linear, GELU, Linear
    book = BookLayerNorm(emb_dim)
    book.load_state_dict(model.final_norm.state_dict())
    model.final_norm = book
    return model


def check_tricks(tricks) -> frozenset:
    unknown = sorted(set(tricks) - set(TRICKS))
    if unknown:
        raise ValueError(f"unknown trick(s) {unknown}; choose from {list(TRICKS)}")
    return frozenset(tricks)


def build_model(cfg: dict, tricks=frozenset()) -> GPTModel:
    """Chapter 4's `GPTModel` with the model-side tricks in `tricks` and the book's pieces for the others.

    "sdpa": PyTorch's fused attention kernel instead of the chapter's mask-and-softmax (config key
    `use_sdpa`); "fused_norm_gelu": our LayerNorm/GELU (`F.layer_norm`, `F.gelu`) instead of the
    book's; "tied_weights": the output head shares the token embedding (config key `tie_weights`;
    this changes the model: fewer parameters, a different initialisation of the shared matrix).
    Under the same seed every choice without "tied_weights" draws the same weights.
    """
    tricks = check_tricks(tricks)
    model = GPTModel({**cfg, "use_sdpa": "sdpa" in tricks, "tie_weights": "tied_weights" in tricks})
    if "fused_norm_gelu" not in tricks:
        use_book_norm_and_gelu(model)
    return model


def make_optimizer_for(model: nn.Module, tricks=frozenset(), lr: float = 4e-4,
                       weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """The book's `torch.optim.AdamW(model.parameters(), ...)` (PyTorch's default implementation: a loop
    over the parameters on a CPU, `foreach` on a GPU), or with "fused_adamw" the fused kernel that
    updates every parameter in one call (the same arithmetic; `llmfs.trainer.make_optimizer` uses it)."""
    tricks = check_tricks(tricks)
    if "fused_adamw" in tricks:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def compile_for(model: GPTModel, tricks=frozenset()) -> GPTModel:
    """With "compile": each transformer block compiled with `torch.compile`, in place ("regional
    compilation": the twelve blocks run the same code, so it is compiled once and reused, which takes
    about half the time of compiling the whole model; the model's forward keeps its input checks,
    whose `int(in_idx.max())` would split a whole-model graph). The first steps trace the blocks and
    generate fused kernels; the parameters stay the model's. Returns the model."""
    if "compile" in check_tricks(tricks):
        for block in model.trf_blocks:
            block.compile()
    return model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_batch: torch.Tensor,
               target_batch: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> float:
    """One step of chapter 5's `train_model_simple`: zero the gradients, chapter 5's loss (under
    autocast when `dtype` is bfloat16), backward, optimizer step. Returns the loss."""
    optimizer.zero_grad()
    with autocast_context(device, dtype):
        loss = calc_loss_batch(input_batch, target_batch, model, device)
    loss.backward()
    optimizer.step()
    return loss.item()


def bf16_supported(device: str = "cpu") -> bool:
    """Whether bfloat16 autocast pays off here: native bf16 on this CPU, or a GPU with bf16."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_supported()


def rung_tricks(rung: int, bf16: bool = True) -> frozenset:
    """The tricks of rung `rung` (cumulative: every trick of the rungs before it too). With `bf16` False
    (hardware without native bfloat16) the bf16 rung adds nothing and later rungs stay in float32."""
    added = [trick for _, trick in LADDER[1:rung + 1]]
    return frozenset(t for t in added if bf16 or t != "bf16")


def load_rung_weights(model: GPTModel, state: dict) -> GPTModel:
    """Load an untied model's state dict (rung 0's weights) into a rung's model. A tied model has one
    matrix for the token embedding and the head: it takes the embedding's, so it computes what the
    untied model computes when its head is a copy of its embedding (the tied rung's own comparison)."""
    state = dict(state)
    if model.out_head.weight is model.tok_emb.weight:
        state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state)
    return model


def batch_size_for(tricks, base: int) -> int:
    return base * LARGER_BATCH_FACTOR if "larger_batch" in check_tricks(tricks) else base


# --- Measuring a rung ------------------------------------------------------------------------------------

def eval_loss(model: nn.Module, input_batch: torch.Tensor, target_batch: torch.Tensor,
              device: torch.device | str, dtype: torch.dtype | None = None) -> float:
    """Chapter 5's loss on one batch with dropout off and no gradients (under autocast for bfloat16):
    a deterministic number to compare the function two models compute."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device, dtype):
            return calc_loss_batch(input_batch, target_batch, model, device).item()
    finally:
        model.train(was_training)


def same_function_losses(cfg: dict, tricks, input_batch: torch.Tensor, target_batch: torch.Tensor,
                         device: torch.device | str = "cpu", seed: int = 123) -> dict:
    """The check each rung makes: the same weights in rung 0's model and in this rung's model, and the
    loss of each (dropout off) on one batch.

    The weights are those drawn under `seed` by rung 0, or, for a tied rung, by the tied model (its
    shared matrix starts small, as GPT-2's; the book's untied embedding starts at N(0, 1), far too large
    for a head). Rung 0's model then gets that one matrix as its embedding and as a copy in its head: the
    tied model cannot hold two different matrices, so this is the untied function it computes.
    """
    tricks = check_tricks(tricks)
    torch.manual_seed(seed)
    state = build_model(cfg, {"tied_weights"} & tricks).state_dict()  # a tied state dict holds the matrix twice
    book = build_model(cfg)
    book.load_state_dict(state)
    model = compile_for(load_rung_weights(build_model(cfg, tricks), state), tricks)
    book.to(device)
    model.to(device)
    return {"reference": eval_loss(book, input_batch, target_batch, device),
            "rung": eval_loss(model, input_batch, target_batch, device, torch.bfloat16 if "bf16" in tricks else None)}


def measure(spec: dict) -> dict:
    """Build one rung's model and optimizer, run `warmup` + `steps` training steps on one fixed random
    batch (the same for every rung under the same seed) and time the steps after the warm-up.

    spec: cfg, tricks (names), batch (before "larger_batch"), ctx, warmup, steps, seed, device;
    check (default True): afterwards, `same_function_losses` on the first `batch` sequences.
    Returns tokens/s (median step), the step times, the losses, minor page faults per timed step
    (CPU), and the peak memory of the work: on a CPU the process's high-water mark (VmHWM) minus its
    RSS before the model was built (meaningful in a fresh process only); on a GPU
    `torch.cuda.max_memory_allocated()`.
    """
    tricks = check_tricks(spec["tricks"])
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if "bf16" in tricks else None
    seed = spec.get("seed", 123)
    batch, ctx = batch_size_for(tricks, spec["batch"]), spec["ctx"]
    # One draw of the largest batch: the first `batch` sequences are the same whatever the batch size.
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, spec["cfg"]["vocab_size"], (batch_size_for({"larger_batch"}, spec["batch"]), ctx + 1),
                         generator=gen)[:batch]
    inputs, targets = data[:, :-1].to(device), data[:, 1:].to(device)
    rss_before = proc_status_mib("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    model = compile_for(build_model(spec["cfg"], tricks).to(device).train(), tricks)
    optimizer = make_optimizer_for(model, tricks)
    times, losses, faults = [], [], []
    for step in range(spec["warmup"] + spec["steps"]):
        if cuda:
            torch.cuda.synchronize(device)
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        losses.append(train_step(model, optimizer, inputs, targets, device, dtype))  # .item() waits for the GPU
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    step_s = statistics.median(times[spec["warmup"]:])
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        hwm = proc_status_mib("VmHWM")
        peak = hwm - rss_before if hwm is not None and rss_before is not None else None
    result = {"tokens_per_s": batch * ctx / step_s, "step_s": step_s, "step_times": times, "losses": losses,
              "warmup_s": sum(times[:spec["warmup"]]), "batch": batch, "peak_mib": peak,
              "page_faults_per_step": statistics.median(faults[spec["warmup"]:]),
              "params": sum(p.numel() for p in model.parameters()), "device": str(device)}
    if spec.get("check", True):
        del model, optimizer  # the check builds two models of its own
        base = spec["batch"]
        result["check"] = same_function_losses(spec["cfg"], tricks, inputs[:base], targets[:base], device, seed)
    return result


# The child: the allocator setting first (before torch allocates anything), then one measurement.
CHILD_SCRIPT = """\
import json, sys
spec = json.loads(sys.argv[1])
from llmfs.runtime import reuse_freed_memory
kept = reuse_freed_memory() if "keep_freed_memory" in spec["tricks"] else False
import torch
if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
from ch05.training_speed.training_speed import measure
print("RESULT " + json.dumps({**measure(spec), "freed_memory_kept": kept}), flush=True)
"""


def measure_in_fresh_process(spec: dict, timeout: float = 1200) -> dict:
    """`measure(spec)` in a new Python process (the allocator setting of "keep_freed_memory" is made
    at start-up, and a fresh process's peak memory belongs to this rung alone). `spec["tricks"]` is a
    list of names here (JSON)."""
    spec = {**spec, "tricks": sorted(check_tricks(spec["tricks"]))}
    proc = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the measurement of {spec['tricks']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
