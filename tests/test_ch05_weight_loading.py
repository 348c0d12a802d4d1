"""ch05/weight-loading/weight-loading.ipynb: GPT-2 weights into `GPTModel` four ways, all giving transformers' logits.

The notebook's claims, recomputed on a tiny random GPT-2 (`transformers`' GPT2LMHeadModel saved with
save_pretrained): its state dict, its model.safetensors, a torch.save'd state dict and the book's nested dict each
load into the same tensors and give transformers' logits and greedy ids; the layout facts (Conv1D weights
transposed, c_attn split into query/key/value, the tied head, the tensor counts); two mistakes that pass every
shape check but change the logits. Then the notebook's stored outputs are read and must show the same.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch

from ch04.gpt import GPTModel, count_parameters
from ch05.gpt_download import (
    assign,
    book_params_to_hf,
    download_and_load_gpt2,
    gpt2_config,
    hf_params_to_book,
    load_gpt2_params,
    load_pretrained_gpt2,
    load_weights_into_gpt,
)
from ch05.gpt_generate import generate
from nbexec import REPO

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

NOTEBOOK = REPO / "ch05" / "weight-loading" / "weight-loading.ipynb"
ATOL = 1e-4  # the notebook's tolerance
TINY = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=300)
# The notebook's quick-mode model.
QUICK = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257)
WAYS = ["way 1, model object", "way 2, safetensors", "way 3, torch.save", "way 4, book's dict"]


def n_params(vocab: int, emb: int, positions: int, layers: int) -> int:
    """GPT-2 with a tied head: embeddings, per block 2 norms + c_attn + c_proj + c_fc + mlp.c_proj, final norm."""
    per_block = 2 * 2 * emb + (3 * emb * emb + 3 * emb) + (emb * emb + emb) + (4 * emb * emb + 4 * emb) \
        + (4 * emb * emb + emb)
    return vocab * emb + positions * emb + layers * per_block + 2 * emb


def cfg_for(dims: dict) -> dict:
    """The notebook's gpt_config_from_hf."""
    return gpt2_config("gpt2", vocab_size=dims["vocab_size"], context_length=dims["n_positions"],
                       emb_dim=dims["n_embd"], n_heads=dims["n_head"], n_layers=dims["n_layer"], drop_rate=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(models_dir, the transformers model) with every tensor random, saved as models_dir/124M as the notebook does."""
    torch.manual_seed(123)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith(".weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    models_dir = tmp_path_factory.mktemp("weight-loading")
    hf.save_pretrained(models_dir / "124M")
    torch.save(hf.state_dict(), models_dir / "gpt2-state-dict.pth")
    return models_dir, hf


@pytest.fixture(scope="module")
def four(tiny):
    """The four ways of the notebook, in its order."""
    models_dir, hf = tiny
    cfg = cfg_for(TINY)
    sources = [
        hf.state_dict(),
        load_file(str(models_dir / "124M" / "model.safetensors")),
        torch.load(models_dir / "gpt2-state-dict.pth", map_location="cpu", weights_only=True),
        hf_params_to_book(hf.state_dict()),
    ]
    return [load_weights_into_gpt(GPTModel(cfg), params).eval() for params in sources]


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(123)
    return torch.randint(0, TINY["vocab_size"], (2, TINY["n_positions"]))


# --- the four ways --------------------------------------------------------------------------------------

def test_each_way_gives_transformers_logits(tiny, four, batch):
    hf = tiny[1]
    with torch.no_grad():
        reference = hf(batch).logits
        for model in four:
            torch.testing.assert_close(model(batch), reference, atol=ATOL, rtol=0)


def test_the_four_ways_hold_identical_tensors(four, batch):
    first = four[0].state_dict()
    with torch.no_grad():
        first_logits = four[0](batch)
        for model in four[1:]:
            sd = model.state_dict()
            assert sd.keys() == first.keys()
            assert all(torch.equal(sd[k], first[k]) for k in first)
            assert torch.equal(model(batch), first_logits)


def test_each_way_gives_transformers_greedy_ids(tiny, four, batch):
    hf = tiny[1]
    ids = batch[:, :8]
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    for model in four:
        assert torch.equal(generate(model, ids, max_new_tokens=10, context_size=TINY["n_positions"]), expected)


def test_the_head_is_tied_and_the_parameters_counted_once(tiny, four):
    hf = tiny[1]
    expected = n_params(TINY["vocab_size"], TINY["n_embd"], TINY["n_positions"], TINY["n_layer"])
    assert count_parameters(hf) == expected
    for model in four:
        assert model.out_head.weight is model.tok_emb.weight
        assert count_parameters(model) == expected
    # a copy: the loaded model does not share memory with the transformers model
    assert four[0].tok_emb.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()


def test_config_mapping_equals_config_json(tiny):
    folder_cfg, _ = load_gpt2_params(tiny[0] / "124M")
    assert cfg_for(TINY) == {**folder_cfg, "drop_rate": 0.0}


def test_load_pretrained_gpt2_on_the_folder_is_way_2(tiny, four):
    one_call = load_pretrained_gpt2(tiny[0] / "124M")
    sd = four[1].state_dict()
    assert all(torch.equal(t, sd[name]) for name, t in one_call.state_dict().items())


# --- the layouts ----------------------------------------------------------------------------------------

def test_tensor_counts(tiny, four):
    models_dir, hf = tiny
    layers = TINY["n_layer"]
    assert len(hf.state_dict()) == 12 * layers + 5  # with lm_head.weight
    assert len(load_file(str(models_dir / "124M" / "model.safetensors"))) == 12 * layers + 4  # without
    assert len(four[0].state_dict()) == 16 * layers + 5  # c_attn's 2 tensors become 6
    sd = torch.load(models_dir / "gpt2-state-dict.pth", map_location="cpu", weights_only=True)
    assert len(sd) == 12 * layers + 5
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()


def test_conv1d_weights_are_transposed_and_c_attn_is_split(tiny, four):
    hf, ours = tiny[1], four[0]
    emb = TINY["n_embd"]
    for i, (theirs, block) in enumerate(zip(hf.transformer.h, ours.trf_blocks)):
        w, b = theirs.attn.c_attn.weight, theirs.attn.c_attn.bias
        assert w.shape == (emb, 3 * emb)
        for k, part in enumerate(("W_query", "W_key", "W_value")):
            layer = getattr(block.att, part)
            assert torch.equal(layer.weight, w[:, k * emb:(k + 1) * emb].T), (i, part)
            assert torch.equal(layer.bias, b[k * emb:(k + 1) * emb]), (i, part)
        assert torch.equal(block.att.out_proj.weight, theirs.attn.c_proj.weight.T)
        assert torch.equal(block.ff.layers[0].weight, theirs.mlp.c_fc.weight.T)
        assert torch.equal(block.ff.layers[2].weight, theirs.mlp.c_proj.weight.T)
        assert torch.equal(block.norm1.scale, theirs.ln_1.weight) and torch.equal(block.norm2.shift, theirs.ln_2.bias)
    # the fused projection's first third is a nn.Linear with the transposed first block of columns
    x = torch.randn(1, 3, emb)
    with torch.no_grad():
        qkv = hf.transformer.h[0].attn.c_attn(x)
        torch.testing.assert_close(qkv[..., :emb], ours.trf_blocks[0].att.W_query(x), atol=1e-6, rtol=0)
    assert hf.lm_head.weight is hf.transformer.wte.weight


def test_book_layout_round_trips_and_the_books_call_reads_the_folder(tiny):
    models_dir, hf = tiny
    params = hf_params_to_book(hf.state_dict())
    assert list(params) == ["wte", "wpe", "blocks", "g", "b"] and len(params["blocks"]) == TINY["n_layer"]
    assert params["blocks"][0]["attn"]["c_attn"]["w"].shape == (TINY["n_embd"], 3 * TINY["n_embd"])
    flat = book_params_to_hf(params)
    hf_flat = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert flat.keys() == hf_flat.keys() and all(torch.equal(flat[k], hf_flat[k]) for k in flat)
    settings, book_params = download_and_load_gpt2("124M", models_dir)
    assert settings == {"n_vocab": 300, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}
    book_flat = book_params_to_hf(book_params)
    assert all(torch.equal(book_flat[k], flat[k]) for k in flat)


def test_assign_needs_the_transpose(tiny):
    params = hf_params_to_book(tiny[1].state_dict())
    target = GPTModel(cfg_for(TINY)).trf_blocks[0].ff.layers[0].weight
    w = params["blocks"][0]["mlp"]["c_fc"]["w"]
    with pytest.raises(ValueError, match="Shape mismatch"):
        assign(target, w)
    assert tuple(assign(target, w.T).shape) == tuple(target.shape)


def test_two_mistakes_pass_the_shape_checks_but_change_the_logits(tiny, four, batch):
    with torch.no_grad():
        reference = tiny[1](batch).logits

    def broken(mistake) -> float:
        model = GPTModel(cfg_for(TINY)).eval()
        model.load_state_dict(four[0].state_dict())  # shapes fit: no error
        with torch.no_grad():
            mistake(model)
            return (model(batch) - reference).abs().max().item()

    def untransposed(model):
        for blk in model.trf_blocks:
            blk.att.out_proj.weight.copy_(blk.att.out_proj.weight.T.clone())

    def swapped(model):
        att = model.trf_blocks[0].att
        q = att.W_query.weight.clone(), att.W_query.bias.clone()
        att.W_query.weight.copy_(att.W_key.weight)
        att.W_query.bias.copy_(att.W_key.bias)
        att.W_key.weight.copy_(q[0])
        att.W_key.bias.copy_(q[1])

    assert broken(untransposed) > 10 * ATOL
    assert broken(swapped) > ATOL


# --- the stored outputs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def output_of(nb: dict, source_line: str) -> str:
    """The stored text output of the one code cell whose source contains `source_line`."""
    found = [c for c in nb["cells"] if c["cell_type"] == "code" and source_line in "".join(c["source"])]
    assert len(found) == 1, f"{len(found)} code cells contain {source_line!r}"
    return "".join("".join(out.get("text", "")) for out in found[0].get("outputs", []))


def all_output(nb: dict) -> str:
    return "".join("".join(out.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for out in c.get("outputs", []))


def test_stored_outputs_are_quick_mode_and_use_the_stated_tolerance(stored):
    assert stored["metadata"]["llmfs"]["mode"] == "quick"
    assert "quick mode: True" in output_of(stored, "QUICK = is_quick()")
    assert "**Stored outputs: quick mode**" in "".join(stored["cells"][0]["source"])
    code = "\n".join("".join(cell["source"]) for cell in stored["cells"] if cell["cell_type"] == "code")
    assert [float(v) for v in re.findall(r"^ATOL = (\S+)$", code, re.M)] == [ATOL]
    # only text outputs: no cell leaves a tensor's repr behind
    kinds = {o["output_type"] for c in stored["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])}
    assert kinds == {"stream"}
    assert "stderr" not in {o.get("name") for c in stored["cells"] if c["cell_type"] == "code"
                            for o in c.get("outputs", [])}


def test_stored_config_and_counts_match_the_formulas(stored):
    expected = n_params(QUICK["vocab_size"], QUICK["n_embd"], QUICK["n_positions"], QUICK["n_layer"])
    assert output_of(stored, "hf_model = transformers.GPT2LMHeadModel").startswith(f"{expected:,} parameters")
    assert f"parameters: ours {expected:,}, transformers {expected:,}" in output_of(stored, "gpt_1 = ")
    cfg_line = output_of(stored, "cfg = gpt_config_from_hf(hf_config)").splitlines()
    assert ast.literal_eval(cfg_line[0]) == cfg_for(QUICK)
    assert cfg_line[1].endswith(": True")
    layers = QUICK["n_layer"]
    assert (f"tensors per block: 12 in transformers, 16 in ours; in all: {12 * layers + 5} and {16 * layers + 5}"
            in output_of(stored, "ours_sd = GPTModel(cfg).state_dict()"))
    assert f"{12 * layers + 4} tensors; lm_head.weight stored: False" in output_of(stored, "st_params = load_file")
    assert (f"{12 * layers + 5} tensors; lm_head.weight shares wte's storage: True"
            in output_of(stored, "sd_3 = torch.load"))
    settings = ast.literal_eval(output_of(stored, "settings, book_params = download_and_load_gpt2").splitlines()[0])
    assert settings == {"n_vocab": QUICK["vocab_size"], "n_ctx": QUICK["n_positions"], "n_embd": QUICK["n_embd"],
                        "n_head": QUICK["n_head"], "n_layer": QUICK["n_layer"]}
    emb = QUICK["n_embd"]
    assert f"Shape mismatch. Left: torch.Size([{4 * emb}, {emb}]), Right: ({emb}, {4 * emb})" in \
        output_of(stored, "c_fc_w = block")


LOGITS = re.compile(r"^(.+): max \|logits - transformers\| = ([0-9.e+-]+), allclose\(atol=([0-9.e-]+)\): (True|False)$",
                    re.M)


def test_stored_logits_of_the_four_ways_agree_and_the_mistakes_do_not(stored):
    found = {m.group(1): (float(m.group(2)), float(m.group(3)), m.group(4) == "True")
             for m in LOGITS.finditer(all_output(stored))}
    assert set(found) == {*WAYS, "out_proj not transposed", "query and key swapped"}
    for label in WAYS:
        diff, atol, close = found[label]
        assert atol == ATOL and close and diff <= ATOL, label
    for label in ("out_proj not transposed", "query and key swapped"):
        diff, atol, close = found[label]
        assert not close and diff > ATOL, label


def test_stored_greedy_text_is_transformers_text_for_each_way(stored):
    out = output_of(stored, "expected[key] = hf_model.generate")
    theirs = re.search(r"^transformers: ('.*')$", out, re.M)
    assert theirs
    rows = re.findall(r"^(.+): same tensors and logits as way 1: (True|False), same greedy ids as transformers: "
                      r"(True|False), ('.*')$", out, re.M)
    assert [r[0] for r in rows] == WAYS
    for label, same_tensors, same_ids, text in rows:
        assert same_tensors == "True" and same_ids == "True", label
        assert text == theirs.group(1) and ast.literal_eval(text).startswith("Every effort moves you"), label


def test_every_printed_check_is_true(stored):
    """The yes/no lines the notebook prints outside the comparisons above all say True."""
    checks = {
        "cfg = gpt_config_from_hf(hf_config)": "the same as load_gpt2_params reads from config.json: True",
        "c_attn = hf_model.transformer.h[0].attn.c_attn": "queries = first third of c_attn's output: True",
        "lm_head.weight is transformer.wte.weight": "lm_head.weight is transformer.wte.weight: True",
        "gpt_1 = ": "out_head.weight is tok_emb.weight: True",
        "a copy, not shared memory": "a copy, not shared memory: True",
        "one_call = load_pretrained_gpt2": "holds the same tensors: True",
        "flat = book_params_to_hf(params)": "book_params_to_hf gives transformers' tensors back: True",
        "book_flat = book_params_to_hf(book_params)": "the same arrays as hf_params_to_book: True",
        "tmp.cleanup()": "temporary folder removed: True",
    }
    for source_line, shown in checks.items():
        assert shown in output_of(stored, source_line), source_line
    assert not re.search(r": False\b", all_output(stored).replace("lm_head.weight stored: False", "")
                         .replace("allclose(atol=0.0001): False", ""))
