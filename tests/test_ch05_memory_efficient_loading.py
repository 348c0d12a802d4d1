"""Chapter 5 bonus notebook: loading weights without twice the memory.

The notebook's own functions (its four ways of loading, the peak-memory reader and the child-process
runner) are taken from its code cells and run here on small models: every way gives the saved
model's weights and logits, writing to loaded weights leaves the file alone, and in fresh processes
the book's way peaks near twice the weights while the meta-device ways stay near once. The stored
outputs (a quick-mode run) must show the same: the table's ratios, identical logits, and a child's
ru_maxrss that is its parent's peak.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from ch03.attention import causal_mask
from ch04.gpt import GPT_CONFIG_124M, GPTModel, count_parameters, model_size_mb

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "ch05" / "memory-efficient-loading" / "memory-efficient-loading.ipynb"
WAY_NAMES = ["load_book_way", "load_mmap", "load_meta_mmap", "load_safetensors_by_tensor"]
META_WAYS = ["load_meta_mmap", "load_safetensors_by_tensor"]
CONSTANTS = {"CHILD_IMPORTS", "WAYS", "ATOL"}
LINUX = Path("/proc/self/status").exists()

TINY = {**GPT_CONFIG_124M, "vocab_size": 1000, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2}
# About 80 MiB of float32 weights: large enough that the import noise of a fresh process (a few MiB)
# cannot blur the difference between ~2x and ~1x.
SMALL = {**GPT_CONFIG_124M, "context_length": 256, "emb_dim": 192, "n_heads": 4, "n_layers": 4}


def notebook_cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


@pytest.fixture(scope="module")
def nb(tmp_path_factory):
    """The notebook's imports, functions and constants, written as a module (so that `inspect.getsource`,
    which builds the child's script, finds them) and imported."""
    parts = []
    for cell in notebook_cells():
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        for node in ast.parse(src).body:
            keep = isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)) or (
                isinstance(node, ast.Assign) and {t.id for t in node.targets if isinstance(t, ast.Name)} & CONSTANTS)
            if keep:
                parts.append(ast.get_source_segment(src, node))
    path = tmp_path_factory.mktemp("nb") / "memload_notebook.py"
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("memload_notebook", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_notebook_defines_the_four_ways(nb):
    assert [f.__name__ for f in nb.WAYS.values()] == WAY_NAMES
    assert nb.ATOL == 1e-5


@pytest.mark.parametrize("way", WAY_NAMES)
def test_every_way_gives_the_saved_weights_and_logits(nb, tmp_path, way):
    reference, weights_mib = nb.save_random_weights(TINY, tmp_path)
    assert weights_mib == pytest.approx(count_parameters(GPTModel(TINY)) * 4 / 2**20)
    saved = torch.load(tmp_path / "model.pth", weights_only=True)
    model = getattr(nb, way)(TINY, tmp_path).eval()
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for block in model.trf_blocks:  # the buffer the file does not hold
        assert torch.equal(block.att.mask, causal_mask(TINY["context_length"]))
    with torch.no_grad():
        logits = model(torch.load(tmp_path / "ids.pt", weights_only=True))
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("way", META_WAYS)
def test_training_a_mapped_model_leaves_the_file_alone(nb, tmp_path, way):
    """The notebook says the mapping is copy-on-write: the parameters change, the file does not."""
    nb.save_random_weights(TINY, tmp_path)
    before = torch.load(tmp_path / "model.pth", weights_only=True)["tok_emb.weight"].clone()
    model = getattr(nb, way)(TINY, tmp_path)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    assert torch.equal(model.tok_emb.weight, before + 1.0)
    assert torch.equal(torch.load(tmp_path / "model.pth", weights_only=True)["tok_emb.weight"], before)
    assert torch.equal(nb.load_safetensors_by_tensor(TINY, tmp_path).tok_emb.weight, before)


@pytest.mark.parametrize("way", META_WAYS)
def test_assign_still_checks_the_shapes(nb, tmp_path, way):
    nb.save_random_weights(TINY, tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        getattr(nb, way)({**TINY, "emb_dim": 32}, tmp_path)


def test_a_meta_model_counts_the_124m_shapes_parameters_without_memory():
    with torch.device("meta"):
        model = GPTModel(GPT_CONFIG_124M)
    d, v, ctx, n = 768, 50257, 1024, 12
    per_block = 4 * d * d + d + 2 * 4 * d * d + 4 * d + d + 4 * d  # Q/K/V/out (+out bias), MLP, two norms
    assert count_parameters(model) == 2 * v * d + ctx * d + n * per_block + 2 * d == 163_009_536
    assert model.tok_emb.weight.is_meta


@pytest.mark.skipif(not LINUX, reason="RSS figures are read from /proc (Linux)")
def test_fresh_processes_show_the_orderings(nb, tmp_path):
    reference, weights_mib = nb.save_random_weights(SMALL, tmp_path)
    assert 60 < weights_mib < 120
    ratio, file_pages = {}, {}
    for load in nb.WAYS.values():
        report = nb.measure(load, SMALL, tmp_path)
        assert torch.allclose(report["logits"], reference, rtol=0, atol=nb.ATOL), load.__name__
        assert report["before"] < 2000  # an interpreter with torch, not this test process's peak
        ratio[load.__name__] = (report["peak"] - report["before"]) / weights_mib
        file_pages[load.__name__] = report["file"]
    assert ratio["load_book_way"] > 1.7 and ratio["load_mmap"] > 1.7, ratio
    for way in META_WAYS:
        assert ratio[way] < 1.2 and ratio[way] < 0.7 * ratio["load_book_way"], ratio
        assert file_pages[way] > 0.3 * weights_mib > file_pages["load_book_way"], file_pages


# --- the stored outputs ----------------------------------------------------------------------------

def stored_text() -> str:
    return "".join("".join(o.get("text", "")) for c in notebook_cells() if c["cell_type"] == "code"
                   for o in c.get("outputs", []))


ROW = re.compile(r"^(124M|355M)\s+(\([a-d]\) .+?)\s{2,}([\d,.]+)\s+([\d,.]+)\s+([\d,.]+)\s+([\d.]+)x\s+([\d,.]+)"
                 r"\s+([\d.]+)\s+(True|False) \(", re.M)


def mib(text: str) -> float:
    return float(text.replace(",", ""))


def test_stored_outputs_are_a_quick_mode_run_of_the_124m_shape():
    text = stored_text()
    assert "quick mode: True | shapes: 124M\n" in text
    assert json.loads(NOTEBOOK.read_text(encoding="utf-8"))["metadata"]["llmfs"]["mode"] == "quick"
    with torch.device("meta"):
        model = GPTModel(GPT_CONFIG_124M)
    assert f"{count_parameters(model):,} parameters, {model_size_mb(model):.1f} MiB in float32" in text
    assert f"124M shape: {model_size_mb(model):,.1f} MiB of float32 weights" in text
    assert re.search(r"CPU: .+ \| torch \d", text)  # the figures name the machine and the torch version


def test_stored_table_shows_two_copies_for_the_books_way_and_one_for_meta():
    text = stored_text()
    rows = {m.group(2): m.groups() for m in ROW.finditer(text)}
    assert len(rows) == 4, text
    ratios = {way[:3]: float(r[5]) for way, r in rows.items()}
    for way, r in rows.items():
        weights, before, delta, file_pages = mib(r[2]), mib(r[3]), mib(r[4]), mib(r[6])
        assert weights == 621.8 and r[8] == "True", r
        assert float(r[5]) == pytest.approx(delta / weights, abs=0.006)
        assert before < 1000  # the child's own start, not the kernel's peak
        if way.startswith(("(c)", "(d)")):
            assert file_pages > 0.6 * weights
        else:
            assert file_pages < 0.05 * weights
    assert 1.8 < ratios["(a)"] < 2.3 and 1.8 < ratios["(b)"] < 2.3, ratios
    assert 0.6 < ratios["(c)"] < 1.05 and 0.6 < ratios["(d)"] < 1.05, ratios


def test_stored_outputs_show_a_child_inheriting_the_kernels_ru_maxrss():
    text = stored_text()
    kernel = mib(re.search(r"this kernel's peak RSS \(VmHWM\):\s+([\d,.]+) MiB", text).group(1))
    child = mib(re.search(r"a new child's ru_maxrss, at its start:\s+([\d,.]+) MiB", text).group(1))
    hwm = mib(re.search(r"the same child's VmHWM:\s+([\d,.]+) MiB", text).group(1))
    assert child >= 0.9 * kernel and hwm < 0.1 * child
