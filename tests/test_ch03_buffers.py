"""ch03/buffers/understanding-buffers.ipynb: the causal mask as a buffer, and the book's model.pth in our GPTModel.

The notebook's claims are recomputed on a tiny config with the project's code (`CausalAttention`,
`MultiHeadAttention`, `GPTModel`, `llmfs.checkpoint.load_model`) and the notebook's own definitions (the book's
listings 3.5, 4.6 and 4.7 and its small subclasses, taken from the .ipynb JSON and executed here, without the
cells' demo code): a plain-attribute mask stays behind when the module moves, `persistent=` decides what
`state_dict()` holds, `.half()` converts float buffers only, the book's saved state dict has exactly one extra
`trf_blocks.N.att.mask` per block, a strict load refuses it, `load_model` drops the masks and gives the book
model's logits. Then the stored outputs (quick mode) are read to check that they show the same.
"""

from __future__ import annotations

import ast
import json
import re
import warnings

import pytest
import torch

from ch03.attention import CausalAttention, MultiHeadAttention, causal_mask
from ch04.gpt import GPT_CONFIG_124M, QUICK_CONFIG, GPTModel
from llmfs.checkpoint import CheckpointMismatchError, load_model
from nbexec import REPO
from test_llmfs_checkpoint import book_state_dict

NOTEBOOK = REPO / "ch03" / "buffers" / "understanding-buffers.ipynb"
TINY = {**QUICK_CONFIG, "vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 3}


def cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


@pytest.fixture(scope="module")
def nb() -> dict:
    """The notebook's imports, classes and functions (not its demo code), executed in one namespace."""
    namespace: dict = {}
    for cell in cells():
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        keep = [node for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef))]
        exec(compile(ast.Module(body=keep, type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
    return namespace


def output(cell_id: str) -> str:
    """The stored text output of one code cell."""
    found = [c for c in cells() if c.get("id") == cell_id]
    assert len(found) == 1 and found[0]["cell_type"] == "code", cell_id
    return "".join("".join(o.get("text", "")) for o in found[0].get("outputs", []))


def source(cell_id: str) -> str:
    return "".join(next(c for c in cells() if c.get("id") == cell_id)["source"])


def book_model(nb: dict, cfg: dict, seed: int = 123) -> torch.nn.Module:
    torch.manual_seed(seed)
    return nb["BookGPTModel"](cfg).eval()


# --- the claims, recomputed ---------------------------------------------------------------------------

def test_our_mask_is_a_buffer_that_is_neither_trained_nor_saved():
    for module in (CausalAttention(3, 2, 6, 0.0), MultiHeadAttention(4, 4, 6, 0.0, num_heads=2)):
        assert dict(module.named_buffers())["mask"].dtype == torch.bool
        assert torch.equal(module.mask, causal_mask(6))
        assert "mask" not in module.state_dict()
        assert all(p is not module.mask for p in module.parameters()) and not module.mask.requires_grad


def test_a_plain_attribute_mask_stays_on_the_cpu_when_the_module_moves(nb):
    plain = nb["PlainMaskCausalAttention"](3, 2, 6, 0.0)
    assert "mask" not in dict(plain.named_buffers()) and "mask" in vars(plain)
    ours = CausalAttention(3, 2, 6, 0.0)
    x = torch.empty(2, 6, 3, device="meta")
    ours.to("meta")
    plain.to("meta")
    assert ours.mask.device.type == "meta" and ours(x).shape == (2, 6, 2)
    assert plain.W_query.weight.device.type == "meta" and plain.mask.device.type == "cpu"
    with pytest.raises(RuntimeError):
        plain(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_plain_attribute_mask_fails_on_a_gpu(nb):
    x = torch.rand(2, 6, 3, device="cuda")
    assert CausalAttention(3, 2, 6, 0.0).to("cuda")(x).device.type == "cuda"
    with pytest.raises(RuntimeError, match="same device"):
        nb["PlainMaskCausalAttention"](3, 2, 6, 0.0).to("cuda")(x)


def test_persistent_decides_what_the_state_dict_holds(nb):
    saved = nb["PersistentMaskCausalAttention"](3, 2, 6, 0.0)
    assert list(saved.state_dict()) == ["mask", "W_query.weight", "W_key.weight", "W_value.weight"]
    assert list(CausalAttention(3, 2, 6, 0.0).state_dict()) == ["W_query.weight", "W_key.weight", "W_value.weight"]
    assert "mask" in dict(saved.named_buffers())


def test_half_and_to_dtype_convert_float_buffers_only(nb):
    book = nb["BookMultiHeadAttention"](3, 2, 6, 0.0, num_heads=2)
    ours = MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    plain = nb["PlainMaskCausalAttention"](3, 2, 6, 0.0)
    plain.mask = plain.mask.float()
    assert book.mask.dtype == torch.float32
    for convert, dtype in ((torch.nn.Module.half, torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16)):
        for module in (book, ours, plain):
            convert(module)
            assert module.W_query.weight.dtype == dtype
        assert book.mask.dtype == dtype and torch.equal(book.mask.bool(), causal_mask(6))
        assert ours.mask.dtype == torch.bool and plain.mask.dtype == torch.float32


def test_mask_bytes_is_the_size_of_the_books_masks(nb):
    mask_bytes = nb["mask_bytes"]
    assert mask_bytes(GPT_CONFIG_124M) == 12 * 1024 * 1024 * 4 == 48 * 2**20
    masks = [b for name, b in book_model(nb, TINY).named_buffers() if name.endswith("att.mask")]
    assert len(masks) == TINY["n_layers"]
    assert mask_bytes(TINY) == sum(m.numel() * m.element_size() for m in masks)


def test_the_books_state_dict_is_ours_plus_one_float_mask_per_block(nb):
    book_state = book_model(nb, TINY).state_dict()
    # The layout tests/test_llmfs_checkpoint.py stands for the book's file: the same keys, the same masks.
    expected = book_state_dict(GPTModel(TINY))
    assert set(book_state) == set(expected)
    extra = set(book_state) - set(GPTModel(TINY).state_dict())
    assert extra == {f"trf_blocks.{i}.att.mask" for i in range(TINY["n_layers"])}
    for key in extra:
        assert book_state[key].dtype == torch.float32 and torch.equal(book_state[key], expected[key])
    # Under the same seed our GPTModel draws exactly the book's weights (same construction order).
    torch.manual_seed(123)
    ours = GPTModel(TINY).state_dict()
    assert all(torch.equal(ours[k], book_state[k]) for k in ours)


def test_the_books_model_pth_loads_with_load_model_and_gives_its_logits(nb, tmp_path):
    book = book_model(nb, TINY)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    state = torch.load(tmp_path / "model.pth", weights_only=True)

    torch.manual_seed(1)
    model = GPTModel(TINY).eval()
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"trf_blocks.0.att.mask\""):
        model.load_state_dict(state)
    assert torch.equal(model.out_head.weight, state["out_head.weight"])  # copied before the error
    result = GPTModel(TINY).load_state_dict(state, strict=False)
    assert result.missing_keys == [] and len(result.unexpected_keys) == TINY["n_layers"]

    torch.manual_seed(1)
    model = GPTModel(TINY).eval()
    with pytest.warns(UserWarning, match=rf"dropped {TINY['n_layers']} attention-mask buffers"):
        load_model(model, tmp_path / "model.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explicit = load_model(GPTModel({**TINY, "use_sdpa": False}).eval(), tmp_path / "model.pth")
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["context_length"]))
    with torch.no_grad():
        expected = book(idx)
        assert torch.allclose(model(idx), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(explicit(idx), expected)


def test_a_mask_that_is_not_causal_is_refused_and_the_model_left_as_it_was(nb, tmp_path):
    state = book_model(nb, TINY).state_dict()
    state["trf_blocks.0.att.mask"] = torch.zeros_like(state["trf_blocks.0.att.mask"])
    torch.save(state, tmp_path / "not-causal.pth")
    model = GPTModel(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: \['trf_blocks.0.att.mask'\]"):
            load_model(model, tmp_path / "not-causal.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_our_file_loads_into_the_books_model_missing_only_the_masks(nb):
    torch.manual_seed(5)
    ours = GPTModel(TINY).eval()
    book = book_model(nb, TINY, seed=2)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\)"):
        book.load_state_dict(ours.state_dict())
    result = book.load_state_dict(ours.state_dict(), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(
        f"trf_blocks.{i}.att.mask" for i in range(TINY["n_layers"]))
    idx = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        assert torch.allclose(book(idx), ours(idx), rtol=1e-5, atol=1e-5)


# --- the stored outputs --------------------------------------------------------------------------------

def test_the_stored_outputs_come_from_quick_mode():
    nb_json = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb_json["metadata"]["llmfs"]["mode"] == "quick"
    first = "".join(nb_json["cells"][0]["source"])
    assert first.startswith("# Chapter 3 bonus: understanding buffers") and "**Stored outputs: quick mode**" in first
    assert "quick mode: True" in output("buffers-01")
    assert "QUICK_CONFIG if QUICK else GPT_CONFIG_124M" in source("buffers-01")
    assert [c["id"] for c in nb_json["cells"]] == [f"buffers-{i:02d}" for i in range(len(nb_json["cells"]))]


def test_the_stored_outputs_show_buffers_moving_saving_and_converting():
    text = output("buffers-03")
    assert "buffers:    [('mask', torch.bool, (6, 6))]" in text
    assert "state_dict: ['W_query.weight', 'W_key.weight', 'W_value.weight']" in text
    assert "mask among the parameters: False | requires_grad: False" in text
    assert "buffers: [] | plain attribute: True" in output("buffers-05")
    moved = output("buffers-07").splitlines()
    assert moved[0].startswith("buffer ") and "mask on meta -> forward runs" in moved[0]
    assert moved[1].startswith("plain attribute") and "mask on cpu -> forward fails: RuntimeError" in moved[1]
    gpu = output("buffers-09")
    assert "no GPU here" in gpu or ("forward runs" in gpu and "forward fails" in gpu)
    saved = output("buffers-11").splitlines()
    assert "state_dict: ['mask', 'W_query.weight'" in saved[0] and "'mask'" not in saved[1].split("state_dict:")[1]
    sizes = [int(m.replace(",", "")) for m in re.findall(r"= ([\d,]+) bytes", output("buffers-13"))]
    assert sizes == [2 * 64 * 64 * 4, 12 * 1024 * 1024 * 4]
    dtypes = output("buffers-17").splitlines()
    assert len(dtypes) == 9 and all(line.endswith("still causal: True") for line in dtypes)
    assert ".half()             book: weights torch.float16  mask torch.float16" in dtypes[3]
    assert "ours: weights torch.float16  mask torch.bool" in dtypes[4]
    assert "plain: weights torch.float16  mask torch.float32" in dtypes[5]


def test_the_stored_outputs_show_the_books_file_loading():
    n = QUICK_CONFIG["n_layers"]
    masks = [f"trf_blocks.{i}.att.mask" for i in range(n)]
    text = output("buffers-21")
    assert f"{n} only in the book's, 0 only in ours" in text
    assert all(f"{key}: torch.float32, (64, 64), the causal mask: True" in text for key in masks)
    grown, held = (int(x.replace(",", "")) for x in
                   re.search(r"is ([\d,]+) bytes larger; its masks hold ([\d,]+) bytes", text).groups())
    assert held == n * 64 * 64 * 4 and held < grown < held + 1000 * n
    strict = output("buffers-23")
    assert "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in masks) in strict
    assert "weights changed anyway: True | now the book's: True" in strict
    assert f"unexpected_keys: {masks}" in output("buffers-25") and "missing_keys:    []" in output("buffers-25")
    loaded = output("buffers-27")
    assert f"UserWarning: <tmp>/model.pth: dropped {n} attention-mask buffers" in loaded
    assert "all weights are the book's: True" in loaded
    logits = output("buffers-29")
    assert "allclose(rtol=1e-05, atol=1e-05): True" in logits and "torch.equal: True" in logits
    code = source("buffers-29")  # the printed tolerance is the one used
    assert "RTOL, ATOL = 1e-5, 1e-5" in code and "torch.allclose(fused_logits, book_logits, rtol=RTOL, atol=ATOL)" in code
    refused = output("buffers-31")
    assert "CheckpointMismatchError: <tmp>/not-causal.pth" in refused and "model left as it was: True" in refused
    other = output("buffers-33")
    assert "Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in masks) in other
    assert "strict=False skipped only the masks: True" in other and "logits equal to the book model's: True" in other
    shown = "".join(output(i) for i in ("buffers-27", "buffers-29", "buffers-31", "buffers-33"))
    assert not re.search(r": False\b", shown)  # every check these cells print came out True
