"""Chapter 5 bonus: ch05/training_speed/training_speed.py and its notebook.

The book's LayerNorm and GELU compute what the fused kernels compute; every rung of the ladder computes rung 0's
function with rung 0's weights (the tied rung: with its head a copy of the embedding); the fused AdamW gives the
book's AdamW's parameters; the tied rung has one shared Parameter. The notebook's stored outputs (a quick-mode run)
must show the same. No timing assertions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ch04.gpt import GPT_CONFIG_124M, GPTModel, gelu_formula
from ch05.gpt_train import calc_loss_batch
from ch05.training_speed import training_speed as ts

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "ch05" / "training_speed" / "training-speed.ipynb"
TINY = {**GPT_CONFIG_124M, "vocab_size": 500, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2}


def batch(n: int = 2, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, TINY["vocab_size"], (n, TINY["context_length"] + 1),
                         generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def test_book_layernorm_and_gelu_equal_the_fused_kernels():
    torch.manual_seed(123)
    x = torch.randn(3, 7, 32) * 4
    norm = ts.BookLayerNorm(32)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
        norm.shift.normal_()
    assert torch.allclose(norm(x), F.layer_norm(x, (32,), norm.scale, norm.shift, 1e-5), atol=1e-5)
    assert torch.allclose(ts.BookGELU()(x), F.gelu(x, approximate="tanh"), atol=1e-6)
    assert torch.allclose(ts.BookGELU()(x), gelu_formula(x), atol=1e-6)


def test_book_pieces_are_swapped_in_with_the_same_weights():
    torch.manual_seed(123)
    ours = GPTModel({**TINY, "use_sdpa": False})
    torch.manual_seed(123)
    book = ts.build_model(TINY)
    assert book.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(book.state_dict().values(), ours.state_dict().values()))
    assert isinstance(book.final_norm, ts.BookLayerNorm)
    assert all(isinstance(b.norm1, ts.BookLayerNorm) and isinstance(b.ff.layers[1], ts.BookGELU)
               for b in book.trf_blocks)
    assert not book.trf_blocks[0].att.use_sdpa
    fused = ts.build_model(TINY, {"fused_norm_gelu", "sdpa"})
    assert type(fused.final_norm).__name__ == "LayerNorm" and fused.trf_blocks[0].att.use_sdpa


def test_ladder_is_cumulative_and_bf16_can_be_left_out():
    assert [trick for _, trick in ts.LADDER[1:]] == list(ts.TRICKS)
    for rung in range(1, len(ts.LADDER)):
        assert ts.rung_tricks(rung - 1) < ts.rung_tricks(rung)
    assert ts.rung_tricks(0) == frozenset()
    assert ts.rung_tricks(len(ts.LADDER) - 1) == frozenset(ts.TRICKS)
    assert "bf16" not in ts.rung_tricks(len(ts.LADDER) - 1, bf16=False)
    assert ts.batch_size_for({"larger_batch"}, 2) == 2 * ts.LARGER_BATCH_FACTOR
    with pytest.raises(ValueError, match="unknown trick"):
        ts.build_model(TINY, {"flash"})


@pytest.mark.parametrize("rung", [r for r in range(len(ts.LADDER)) if ts.LADDER[r][1] != "compile"])
def test_every_rung_computes_rung_0s_function(rung):
    tricks = ts.rung_tricks(rung, bf16=True)
    inputs, targets = batch()
    losses = ts.same_function_losses(TINY, tricks, inputs, targets)
    atol = ts.ATOL_BF16 if "bf16" in tricks else ts.ATOL_FP32
    assert losses["rung"] == pytest.approx(losses["reference"], abs=atol)
    if "tied_weights" not in tricks:  # untied rungs: exactly rung 0's weights, so rung 0's loss
        torch.manual_seed(123)
        book = ts.build_model(TINY).eval()
        with torch.no_grad():
            assert losses["reference"] == pytest.approx(calc_loss_batch(inputs, targets, book, "cpu").item(),
                                                        abs=1e-6)


def test_compiled_rung_computes_rung_0s_function():
    """torch.compile on one small model (a few seconds of compiling)."""
    cfg = {**TINY, "n_layers": 1}
    tricks = {"fused_adamw", "sdpa", "fused_norm_gelu", "compile"}
    model = ts.compile_for(ts.build_model(cfg, tricks), tricks)
    assert model.trf_blocks[0]._compiled_call_impl is not None
    losses = ts.same_function_losses(cfg, tricks, *batch())
    assert losses["rung"] == pytest.approx(losses["reference"], abs=ts.ATOL_FP32)


def test_tied_rung_shares_one_parameter_and_sums_both_gradients():
    torch.manual_seed(123)
    tied = ts.build_model(TINY, {"tied_weights", "sdpa", "fused_norm_gelu"})
    assert tied.out_head.weight is tied.tok_emb.weight
    untied = ts.build_model(TINY, {"sdpa", "fused_norm_gelu"})
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - TINY["vocab_size"] * TINY["emb_dim"]
    # The untied model with the tied model's matrix in both places: same loss, and the tied gradient
    # is the sum of the untied model's two gradients.
    state = tied.state_dict()
    untied.load_state_dict(state)
    inputs, targets = batch()
    tied.eval(), untied.eval()
    lt, lu = calc_loss_batch(inputs, targets, tied, "cpu"), calc_loss_batch(inputs, targets, untied, "cpu")
    assert lt.item() == pytest.approx(lu.item(), abs=1e-6)
    lt.backward(), lu.backward()
    assert torch.allclose(tied.tok_emb.weight.grad, untied.tok_emb.weight.grad + untied.out_head.weight.grad,
                          atol=1e-6)


def test_fused_adamw_gives_the_same_parameters_as_foreach_and_the_default():
    torch.manual_seed(123)
    models = [ts.build_model({**TINY, "drop_rate": 0.0}) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [ts.make_optimizer_for(models[0]), ts.make_optimizer_for(models[1], {"fused_adamw"}),
            torch.optim.AdamW(models[2].parameters(), lr=4e-4, weight_decay=0.1, foreach=True)]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    inputs, targets = batch()
    for _ in range(3):
        for m, opt in zip(models, opts):
            ts.train_step(m, opt, inputs, targets, "cpu")
    for other in models[1:]:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(models[0].parameters(), other.parameters()))
    assert not torch.equal(models[0].tok_emb.weight, ts.build_model(TINY).tok_emb.weight)  # they did train


def test_measure_reports_a_rung():
    spec = {"cfg": TINY, "tricks": ["fused_adamw", "larger_batch"], "batch": 2, "ctx": 16, "warmup": 1, "steps": 2}
    r = ts.measure(spec)
    assert r["batch"] == 2 * ts.LARGER_BATCH_FACTOR and len(r["losses"]) == len(r["step_times"]) == 3
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * 16 / r["step_s"])
    assert r["page_faults_per_step"] >= 0 and r["check"]["rung"] == pytest.approx(r["check"]["reference"], abs=1e-4)
    book = ts.measure({**spec, "tricks": []})
    fused = ts.measure({**spec, "tricks": ["fused_adamw"]})
    assert book["losses"] == pytest.approx(fused["losses"], abs=1e-5)  # same model, same data, same dropout


# --- The notebook's stored outputs (quick mode) -------------------------------------------------------

def stored_text() -> str:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []))


def test_notebook_stores_a_quick_mode_run_with_its_checks():
    text = stored_text()
    assert "quick mode: True" in text and "CPU: " in text and "torch " in text
    assert "book LayerNorm == F.layer_norm (atol=1e-05): True" in text
    assert "book GELU == F.gelu(approximate='tanh') (atol=1e-06): True" in text
    assert re.search(r"same parameters as the book's AdamW after 3 steps \(atol=1e-06\): True", text)
    assert "rungs 0 and 1: the same loss at every training step (atol=0.0001): True" in text
    # One line per rung measured in the kernel (all but the allocator rung, which runs in fresh processes),
    # and the summary's "every rung the same function".
    same = re.findall(r"same function: (True|False)", text)
    assert len(same) == len(ts.LADDER) and set(same) == {"True"}
    assert "every rung the same function: True" in text
    assert re.search(r"rung 5 \+ bf16 autocast\s+fresh process: .*freed memory kept: False", text)
    assert re.search(r"rung 6 \+ keep freed memory\s+fresh process: .*freed memory kept: True", text)
    for _, trick in ts.LADDER[1:]:
        name = dict((t, n) for n, t in ts.LADDER[1:])[trick]
        assert re.search(rf"{re.escape(name)}\s+\d+\.\d\dx  (helps|slower|no clear effect)", text), name
