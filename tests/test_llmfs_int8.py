"""llmfs.int8: int8 weights keep a trained model's quality, match transformers' logits closely for every
family, coexist with llmfs.decoding_layout, and the generation commands' --int8 works end to end."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import llmfs.int8 as int8
from ch02.dataloader import create_dataloader_v1
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch05.gpt_generate import generate
from ch05.gpt_train import calc_loss_batch, calc_loss_loader
from hf_tiny import model_dir_fixture, verdict
from llmfs.checkpoint import save_model
from llmfs.decoding_layout import layout_for_decoding
from llmfs.int8 import Int8Linear, quantize_int8, quantize_weight

REPO = Path(__file__).resolve().parents[1]
# A small GPT whose widths are multiples of 32, so its layers run in the CPU kernel.
TINY = {**GPT_CONFIG_124M, "n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 64, "drop_rate": 0.0}
TRAIN_STEPS = 225  # lr 1e-3, dropout 0.1: about where the validation loss stops falling (~300 perplexity)
PROMPT = "Every effort moves you"
GREEDY_TOKENS = 40  # greedy tokens compared, int8 vs float32
MIN_EQUAL_TOKENS = 30  # at least this many leading tokens must agree (all 40 did when this was written)
MIN_EQUAL_TOKENS_DYNAMIC = 20  # the same for --int8 dynamic (activations rounded too)


# --- The layer --------------------------------------------------------------------------------

def test_quantized_weight_is_within_half_a_step_of_the_float_one():
    torch.manual_seed(123)
    w = torch.randn(96, 64)
    w[3] = 0.0  # a row of zeros: scale 1, q 0, no division by zero
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and q.is_contiguous() and q.abs().max() == 127
    assert torch.all((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7)
    assert torch.equal(q[3], torch.zeros(64, dtype=torch.int8))
    # A weight stored transposed in memory (llmfs.decoding_layout) quantizes to the same numbers.
    q2, scales2 = quantize_weight(w.t().contiguous().t())
    assert torch.equal(q, q2) and torch.equal(scales, scales2)


def test_quantizing_in_blocks_of_rows_changes_nothing(monkeypatch):
    torch.manual_seed(123)
    w = torch.randn(50, 64)
    whole = quantize_weight(w)
    monkeypatch.setattr(int8, "QUANTIZE_BLOCK_ROWS", 7)  # 50 rows: 7 full blocks and a short one
    blocks = quantize_weight(w)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [64, 40])  # 40: not a multiple of 32, the dequantizing fallback
def test_int8_linear_computes_the_dequantized_product(dtype, in_features, monkeypatch):
    torch.manual_seed(123)
    linear = nn.Linear(in_features, 48, dtype=dtype)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.scales.dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(2, 5, in_features, dtype=dtype)
    dequantized = layer.weight.float() * layer.scales.float()[:, None]
    expected = x.float() @ dequantized.T + layer.bias.float()
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    # The kernel rounds the activations to bfloat16 (llmfs.int8's docstring): relative error ~2^-8.
    torch.testing.assert_close(y.float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)
    # ... and the fallback (other devices) gives the same product.
    monkeypatch.setattr(int8, "kernel_usable", lambda weight: False)
    torch.testing.assert_close(layer(x).float(), y.float(), atol=2e-2 * expected.abs().max().item(), rtol=0)


def test_the_kernel_runs_where_it_was_checked():
    assert int8.int8_kernel_available()  # torch 2.13's CPU build has it
    assert int8.kernel_usable(torch.zeros(8, 64, dtype=torch.int8))
    assert not int8.kernel_usable(torch.zeros(8, 40, dtype=torch.int8))  # it miscomputes such widths


def test_quantize_swaps_every_projection_and_keeps_the_embedding_float():
    torch.manual_seed(123)
    model = GPTModel({**TINY, "tie_weights": True})
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.out_head, Int8Linear) and model.tok_emb.weight.dtype == torch.float32
    # Tied: the head holds its own int8 copy of the shared matrix, the table stays for the lookup.
    q, _ = quantize_weight(model.tok_emb.weight)
    assert torch.equal(model.out_head.weight, q)
    assert int8.int8_weight_bytes(model) < float_bytes / 3.5  # a quarter, plus 4 bytes of scale per row
    assert quantize_int8(model) is model  # again: nothing left to swap


# --- Quality of a trained model ---------------------------------------------------------------

class CompactTokenizer:
    """GPT-2's tokenizer with its ids renumbered to the tokens the-verdict uses (~1,100): the chapter's data
    loader runs as it is, and a tiny model trains in seconds instead of paying for a 50,257-row head."""

    def __init__(self, *texts: str):
        self.gpt2 = get_gpt2_tokenizer()
        used = sorted({t for text in texts for t in self.gpt2.encode(text)})
        self.to_compact = {t: i for i, t in enumerate(used)}
        self.to_gpt2 = used

    def encode(self, text: str, **kwargs) -> list[int]:
        return [self.to_compact[t] for t in self.gpt2.encode(text, **kwargs)]

    def decode(self, ids: list[int]) -> str:
        return self.gpt2.decode([self.to_gpt2[i] for i in ids])


@pytest.fixture(scope="module")
def trained():
    """(model, validation loader, tokenizer): a tiny GPT trained TRAIN_STEPS steps on the-verdict."""
    text = verdict()
    split = int(0.9 * len(text))
    tokenizer = CompactTokenizer(text, text[:split], text[split:])
    cfg = {**TINY, "vocab_size": len(tokenizer.to_gpt2), "drop_rate": 0.1}
    common = dict(batch_size=8, max_length=cfg["context_length"], tokenizer=tokenizer)
    train_loader = create_dataloader_v1(text[:split], stride=cfg["context_length"] // 2, drop_last=True,
                                        shuffle=True, generator=torch.Generator().manual_seed(123), **common)
    val_loader = create_dataloader_v1(text[split:], stride=cfg["context_length"], drop_last=False, shuffle=False,
                                      **common)
    torch.manual_seed(123)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    step = 0
    while step < TRAIN_STEPS:
        for x, y in train_loader:
            optimizer.zero_grad()
            calc_loss_batch(x, y, model, "cpu").backward()
            optimizer.step()
            step += 1
            if step == TRAIN_STEPS:
                break
    return model.eval(), val_loader, tokenizer


def test_int8_keeps_validation_perplexity_within_one_percent(trained):
    model, val_loader, _ = trained
    quantized = quantize_int8(copy.deepcopy(model))
    with torch.no_grad():
        float_ppl = math.exp(calc_loss_loader(val_loader, model, "cpu"))
        int8_ppl = math.exp(calc_loss_loader(val_loader, quantized, "cpu"))
    assert float_ppl < model.cfg["vocab_size"] / 4  # it learned something (untrained: ~vocab_size)
    print(f"validation perplexity: float32 {float_ppl:.2f}, int8 {int8_ppl:.2f} "
          f"({100 * (int8_ppl / float_ppl - 1):+.2f}%)")
    assert abs(int8_ppl / float_ppl - 1) < 0.01


def equal_greedy_tokens(trained, mode: str) -> int:
    """How many leading greedy tokens after the story's start the int8 model (`mode`) shares with float32."""
    model, _, tokenizer = trained
    quantized = quantize_int8(copy.deepcopy(model), mode)
    ids = torch.tensor([tokenizer.encode(verdict())[:16]])  # the story's start
    outs = [generate(m, ids, GREEDY_TOKENS, model.cfg["context_length"], use_cache=True)[0, ids.shape[1]:]
            for m in (model, quantized)]
    different = (outs[0] != outs[1]).nonzero()
    equal = GREEDY_TOKENS if len(different) == 0 else int(different[0])
    print(f"greedy, {mode}: {equal} of {GREEDY_TOKENS} tokens equal: {tokenizer.decode(outs[1].tolist())!r}")
    return equal


def test_int8_greedy_text_equals_float32(trained):
    assert equal_greedy_tokens(trained, "weights") >= MIN_EQUAL_TOKENS


def decoding_perplexity(model: nn.Module, loader) -> float:
    """Perplexity with every token fed alone through the KV cache, as generation feeds them (the path
    `--int8 dynamic` changes)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            for row in range(x.shape[0]):
                model.reset_kv_cache()
                logits = torch.cat([model(x[row:row + 1, t:t + 1], use_cache=True) for t in range(x.shape[1])], 1)
                total += float(torch.nn.functional.cross_entropy(logits[0], y[row], reduction="sum"))
                count += y.shape[1]
    model.reset_kv_cache()
    return math.exp(total / count)


needs_fbgemm = pytest.mark.skipif(not int8.dynamic_kernel_available(),
                                  reason="--int8 dynamic needs fbgemm (x86 builds of PyTorch)")


@needs_fbgemm
def test_dynamic_int8_keeps_decoding_perplexity_within_one_percent(trained):
    model, val_loader, _ = trained
    weights, dynamic = (quantize_int8(copy.deepcopy(model), mode) for mode in ("weights", "dynamic"))
    ppl = {name: decoding_perplexity(m, val_loader)
           for name, m in (("float32", model), ("weights", weights), ("dynamic", dynamic))}
    print("decoding perplexity: " + ", ".join(f"{k} {v:.2f} ({100 * (v / ppl['float32'] - 1):+.2f}%)"
                                               for k, v in ppl.items()))
    assert ppl["float32"] == pytest.approx(math.exp(calc_loss_loader(val_loader, model, "cpu")), rel=1e-4)
    assert abs(ppl["dynamic"] / ppl["float32"] - 1) < 0.01 and abs(ppl["weights"] / ppl["float32"] - 1) < 0.01
    assert ppl["dynamic"] != ppl["weights"]  # the activations' rounding is really there


@needs_fbgemm
def test_dynamic_int8_keeps_whole_sequence_perplexity_within_one_percent(trained):
    """The validation text fed whole (each batch a (rows, tokens) prompt), the path of `_prompt_product`."""
    model, val_loader, _ = trained
    dynamic = quantize_int8(copy.deepcopy(model), "dynamic")
    with torch.no_grad():
        float_ppl = math.exp(calc_loss_loader(val_loader, model, "cpu"))
        dynamic_ppl = math.exp(calc_loss_loader(val_loader, dynamic, "cpu"))
    print(f"validation perplexity: float32 {float_ppl:.2f}, int8 dynamic {dynamic_ppl:.2f} "
          f"({100 * (dynamic_ppl / float_ppl - 1):+.2f}%)")
    assert abs(dynamic_ppl / float_ppl - 1) < 0.01 and dynamic_ppl != float_ppl


@needs_fbgemm
def test_dynamic_int8_greedy_text_is_close_to_float32(trained):
    assert equal_greedy_tokens(trained, "dynamic") >= MIN_EQUAL_TOKENS_DYNAMIC


@needs_fbgemm
def test_dynamic_layer_rounds_each_token_row_alone():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = int8.DynamicInt8Linear.from_linear(linear)
    weight_only = Int8Linear.from_linear(linear)
    x = torch.randn(5, 1, 64)
    x[3] *= 40  # a row with large activations: its scale must not coarsen the others' rounding
    with torch.no_grad():
        rows = layer(x)
        assert torch.equal(rows[1], layer(x[1:2])[0]) and torch.equal(rows[2], layer(x[2])) and rows.shape == (5, 1, 48)
        # close to the float product, and not the weight-only numbers (the activations are rounded)
        want = linear(x)
        assert ((rows - want).norm() / want.norm()) < 0.02 and not torch.equal(rows, weight_only(x))
        # A prompt's tokens go in one call, each still rounded on a grid of its own: a token's numbers are
        # the same alone, beside a token of 40x larger activations, or beside another prompt's tokens.
        prompt = torch.randn(1, 6, 64)
        prompt[0, 2] *= 40
        prompt[0, 4, 7] = 300.0  # one outlier
        prompt[0, 5] = 0.0  # a row of zeros (no division by zero)
        together = layer(prompt)
        others = torch.randn(2, 6, 64) * 5
        assert torch.equal(layer(torch.cat([others, prompt]))[2], together[0])
        for t in range(1, 6):
            assert torch.equal(layer(prompt[:, t - 1:t + 1])[0, 1], together[0, t])
        assert torch.equal(together[0, 5], layer.bias.detach())
        want = linear(prompt)
        assert ((together - want).norm() / want.norm()) < 0.02 and not torch.equal(together, weight_only(prompt))
        for engine in torch.backends.quantized.supported_engines:  # the packed weight keeps fbgemm
            with _engine(engine):
                assert torch.equal(layer(x), rows)
        restored = int8.DynamicInt8Linear(64, 48)
        restored.load_state_dict(layer.state_dict())  # the packed copy follows the loaded weight
        assert torch.equal(restored(x), rows) and torch.equal(restored(prompt), layer(prompt))


def _engine(name: str):
    import contextlib

    @contextlib.contextmanager
    def switched():
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = name
        try:
            yield
        finally:
            torch.backends.quantized.engine = before
    return switched()


def test_order_with_decoding_layout_does_not_matter(trained):
    model, val_loader, _ = trained
    x, _ = next(iter(val_loader))
    first = quantize_int8(layout_for_decoding(copy.deepcopy(model)))
    second = layout_for_decoding(quantize_int8(copy.deepcopy(model)))
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


# --- Every family: logits close to transformers' float32 ones -----------------------------------

FAMILIES = ["llama", "qwen3", "qwen3_moe", "gemma3_text"]
# Random tiny models have small logits (|logit| < ~1.3), where int8 rounding shows most: measured when
# written, the relative (Frobenius) error of the logits was 1.0-3.1% and the largest error 0.6-5.1% of the
# largest logit (Gemma 3 the most; the same folder cast to bfloat16 shows 1.7% and 2.5%).
RELATIVE_TOLERANCE = 0.05  # of the logits' norm
MAX_TOLERANCE = 0.08  # of the largest |logit|


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, *model_dir_fixture(tmp_path_factory, request.param)


def _close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert (ours - expected).norm() / expected.norm() < RELATIVE_TOLERANCE
    assert (ours - expected).abs().max() < MAX_TOLERANCE * expected.abs().max()


def test_every_family_runs_int8_close_to_transformers(family_dir):
    from ch05.llama.generate_llm import load_llm

    family, path, hf = family_dir
    llm = load_llm(path, int8=True)
    model = llm.model
    assert "int8" in llm.description
    floats = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    # Only a mixture-of-experts router stays float; every expert is int8.
    assert floats == ([f"trf_blocks.{i}.ff.gate" for i in range(len(model.trf_blocks))]
                      if family == "qwen3_moe" else [])
    if family == "qwen3_moe":
        assert all(isinstance(m, Int8Linear) for m in model.trf_blocks[0].ff.fc1)
    assert isinstance(model.out_head, Int8Linear) and model.tok_emb.weight.dtype == torch.float32
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        expected = hf(ids).logits
        _close(model(ids), expected)
        model.reset_kv_cache()  # through the KV cache in uneven chunks: a prefill, single tokens, a chunk
        chunks = [model(ids[:, a:b], use_cache=True) for a, b in ((0, 10), (10, 11), (11, 12), (12, 20))]
        model.reset_kv_cache()
    _close(torch.cat(chunks, dim=1), expected)


# --- The commands -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_path(tmp_path_factory) -> Path:
    """A chapter-5 style model.pth (widths that run in the kernel) with its config.json."""
    folder = tmp_path_factory.mktemp("ch05-int8")
    torch.manual_seed(123)
    save_model(GPTModel(TINY), folder / "model.pth")
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder / "model.pth"


def _int8_continuation(path: Path, new_tokens: int, mode: str = "weights") -> str:
    """What the int8 model writes greedily after PROMPT (computed here, not by a command)."""
    from ch05.gpt_generate import load_model_for_generation

    model = quantize_int8(load_model_for_generation(path)[0], mode)
    tokenizer = get_gpt2_tokenizer()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    out = generate(model, ids, new_tokens, model.cfg["context_length"], use_cache=True)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def test_gpt_generate_int8(gpt_path, capsys):
    from ch05.cli import generate_main

    argv = ["--model", str(gpt_path), "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu"]
    assert generate_main([*argv, "--int8"]) == 0
    out, err = capsys.readouterr()
    assert "int8 weights" in err
    assert out.strip() == (PROMPT + _int8_continuation(gpt_path, 12)).strip()


@needs_fbgemm
def test_ch05_llama_int8_dynamic_on_a_gpt_model(gpt_path, capsys):
    """`python -m ch05.llama --int8 dynamic` on a chapter-5 GPT: the text of the dynamic int8 model."""
    from ch05.llama.generate_llm import main

    argv = ["--model", str(gpt_path.parent), "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu",
            "--int8", "dynamic"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "int8 weights and activations (dynamic)" in err
    assert out.strip() == (PROMPT + _int8_continuation(gpt_path, 12, "dynamic")).strip()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return model_dir_fixture(tmp_path_factory, "qwen3")[0]


def test_ch05_llama_int8(qwen_dir, capsys):
    from ch05.llama.generate_llm import generate_text, load_llm, main

    path = qwen_dir
    prompt = verdict()[:80]
    argv = ["--model", str(path), "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu"]
    assert main([*argv, "--int8"]) == 0
    out, err = capsys.readouterr()
    assert "int8 weights" in err
    text, _ = generate_text(load_llm(path, int8=True), prompt, 8)
    assert out == prompt + text + "\n"
    if int8.dynamic_kernel_available():
        assert main([*argv, "--int8", "dynamic"]) == 0
        out, err = capsys.readouterr()
        assert "int8 weights and activations (dynamic)" in err
        llm = load_llm(path, int8="dynamic")
        assert isinstance(llm.model.out_head, int8.DynamicInt8Linear)
        assert out == prompt + generate_text(llm, prompt, 8)[0] + "\n"


@pytest.mark.parametrize("mode", ["weights", pytest.param("dynamic", marks=needs_fbgemm)])
def test_server_with_int8_answers_through_the_ollama_client(gpt_path, mode):
    import ollama

    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFS_DEVICE": "cpu", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen([sys.executable, "-m", "ch07.serve", "--model", str(gpt_path), "--port", "0", "--int8",
                             mode],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not (lines and "OLLAMA_HOST=" in lines[-1]):
            lines.append(proc.stderr.readline())
            assert lines[-1] and time.monotonic() < deadline, "the server stopped: " + "".join(lines)
        assert any(("int8 weights and activations" in line) == (mode == "dynamic") and "int8 weights" in line
                   for line in lines)
        client = ollama.Client(host=re.search(r"OLLAMA_HOST=(\S+)", lines[-1]).group(1))
        name = client.list().models[0].model
        reply = client.generate(model=name, prompt=PROMPT, options={"temperature": 0, "num_predict": 10})
        assert reply.eval_count == 10 and reply.response == _int8_continuation(gpt_path, 10, mode)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_apps_load_int8(gpt_path):
    from ch05.gpt_generate import load_model_for_generation
    from llmfs.apps import load_app_model

    app = load_app_model(load_model_for_generation, str(gpt_path), "cpu", "hint", int8=True)
    assert app.error is None and isinstance(app.model.out_head, Int8Linear)


@pytest.mark.parametrize("argv, words", [
    (["-m", "ch05.gpt_generate", "--int8", "--onednn"], "--int8 and --onednn do not combine"),
    (["-m", "ch05.gpt_train", "--int8"], "unrecognized arguments: --int8"),  # training: no such switch
    (["-m", "ch05.llama", "--int8", "int4"], "argument --int8: invalid choice: 'int4'"),
])
def test_bad_combinations_are_one_line(argv, words):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and words in errors[0] and "Traceback" not in proc.stderr


def test_dynamic_is_refused_where_it_cannot_run(monkeypatch):
    from llmfs.errors import InvalidInput

    monkeypatch.setattr(int8, "dynamic_kernel_available", lambda: False)
    with pytest.raises(InvalidInput, match="^--int8 dynamic needs fbgemm"):
        int8.check_int8_options("dynamic")
    int8.check_int8_options("weights")  # weight-only runs anywhere
    with pytest.raises(InvalidInput, match="^--int8 dynamic needs fbgemm"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4)), "dynamic")
    with pytest.raises(InvalidInput, match="^--int8 dynamic runs on the CPU of an x86 machine .* not on meta;"):
        int8.DynamicInt8Linear.from_linear(nn.Linear(4, 4, device="meta"))
    assert [int8.int8_mode(v) for v in (None, False, True, "weights", "dynamic")] == [None, None, "weights",
                                                                                        "weights", "dynamic"]
