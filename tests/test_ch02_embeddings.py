"""ch02/embeddings/embeddings-vs-matmul.ipynb: an embedding lookup is a product with one-hot vectors.

The notebook's claims, recomputed with PyTorch and the project's GPT-2 tokenizer (small sizes, fixed seeds):
the book's example gives the book's weights; `nn.Embedding(ids)`, `one_hot(ids) @ W` and `nn.Linear` with
weight `W.T` give identical outputs and gradients; only the looked-up rows get a gradient (a repeated id the
sum); one SGD step moves only those rows, AdamW with weight decay all of them; the sparse gradient holds one row
per distinct id; the memory formula; and the lookup is far faster than the product. Then the notebook's stored
outputs (read from the .ipynb JSON, nothing executes) must show the same.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import torch.nn.functional as F

from nbexec import REPO
from test_golden_ch02_ch03_appendix_a import assert_shows, flat, output_of

NOTEBOOK = REPO / "ch02" / "embeddings" / "embeddings-vs-matmul.ipynb"
GPT2_VOCAB, GPT2_DIM = 50257, 768
BOOK_IDS = [2, 3, 5, 1]
# The book's embedding weights (section 2.7: torch.manual_seed(123), nn.Embedding(6, 3)).
BOOK_WEIGHTS = [[0.3374, -0.1778, -0.1690], [0.9178, 1.5810, 1.3010], [1.2753, -0.2010, -0.1606],
                [-0.4015, 0.9666, -1.1481], [-1.1589, 0.3255, -0.6315], [-2.8400, -0.7849, -1.4096]]
ATOL = 1e-4  # the notebook's tolerance for gradients summed in another order


def three_ways(ids: torch.Tensor, weight: torch.Tensor, upstream: torch.Tensor | None = None):
    """Outputs and weight gradients of the lookup, one_hot @ W and nn.Linear(weight=W.T), each on its own copy."""
    num_rows, dim = weight.shape
    upstream = torch.ones(len(ids), dim) if upstream is None else upstream
    one_hot = F.one_hot(ids, num_classes=num_rows).float()

    embedding = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False)
    w = weight.clone().requires_grad_()
    linear = torch.nn.Linear(num_rows, dim, bias=False)
    linear.weight = torch.nn.Parameter(weight.T.clone())
    outputs = [embedding(ids), one_hot @ w, linear(one_hot)]
    for out in outputs:
        (out * upstream).sum().backward()
    return [out.detach() for out in outputs], [embedding.weight.grad, w.grad, linear.weight.grad.T]


def nonzero_rows(grad: torch.Tensor) -> list[int]:
    return torch.nonzero((grad != 0).any(dim=1)).flatten().tolist()


def book_weight() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.nn.Embedding(6, 3).weight.detach()


@pytest.fixture(scope="module")
def gpt2_ids(tokenizer) -> list[int]:
    from llmfs.download import get_data_file

    text = get_data_file("the-verdict.txt", download=False).read_text(encoding="utf-8")
    return tokenizer.encode(text)


# --- the claims, recomputed -------------------------------------------------------------------------

def test_the_book_example_gives_the_books_weights_and_three_equal_outputs():
    weight = book_weight()
    assert torch.allclose(weight, torch.tensor(BOOK_WEIGHTS), atol=1e-4)
    ids = torch.tensor(BOOK_IDS)
    (lookup, matmul, linear), _ = three_ways(ids, weight)
    assert torch.equal(lookup, weight[ids])
    assert torch.equal(lookup, matmul) and torch.equal(lookup, linear)  # identical: tolerance 0


@pytest.mark.parametrize("ids, expected", [(BOOK_IDS, {1: 1.0, 2: 1.0, 3: 1.0, 5: 1.0}),
                                           ([2, 3, 5, 1, 3], {1: 1.0, 2: 1.0, 3: 2.0, 5: 1.0})])
def test_only_looked_up_rows_get_a_gradient_and_a_repeated_id_gets_the_sum(ids, expected):
    ids = torch.tensor(ids)
    _, (lookup, matmul, linear) = three_ways(ids, book_weight())
    assert torch.equal(lookup, matmul) and torch.equal(lookup, linear)
    want = torch.zeros(6, 3)
    for row, value in expected.items():
        want[row] = value
    assert torch.equal(lookup, want)
    one_hot = F.one_hot(ids, num_classes=6).float()
    assert torch.equal(matmul, one_hot.T @ torch.ones(len(ids), 3))  # the product's gradient: one_hot.T @ grad


def test_sgd_moves_only_the_looked_up_rows_and_adamw_with_weight_decay_moves_all():
    def changed(optimizer_class, **settings):
        torch.manual_seed(123)
        layer = torch.nn.Embedding(6, 3)
        before = layer.weight.detach().clone()
        optimizer = optimizer_class(layer.parameters(), **settings)
        layer(torch.tensor(BOOK_IDS)).sum().backward()
        optimizer.step()
        return nonzero_rows(layer.weight.detach() - before)

    assert changed(torch.optim.SGD, lr=0.1) == [1, 2, 3, 5]
    assert changed(torch.optim.AdamW, lr=0.0004, weight_decay=0.1) == [0, 1, 2, 3, 4, 5]


def test_at_gpt2s_vocabulary_with_real_ids(gpt2_ids):
    """GPT-2's 50,257 rows (16 dimensions instead of 768, to stay small) and the start of The Verdict."""
    ids = torch.tensor(gpt2_ids[:64])
    distinct = sorted(set(ids.tolist()))
    assert len(distinct) < len(ids)  # repeated tokens: their gradients are sums
    torch.manual_seed(123)
    weight = torch.randn(GPT2_VOCAB, 16)
    upstream = torch.randn(len(ids), 16)
    (lookup, matmul, linear), grads = three_ways(ids, weight, upstream)
    assert torch.equal(lookup, matmul) and torch.equal(lookup, linear)
    for grad in grads:
        assert nonzero_rows(grad) == distinct
        assert torch.allclose(grad, grads[0], rtol=0, atol=ATOL)

    sparse = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False, sparse=True)
    (sparse(ids) * upstream).sum().backward()
    coalesced = sparse.weight.grad.coalesce()
    assert coalesced.indices()[0].tolist() == distinct
    assert torch.allclose(coalesced.values(), grads[0][distinct], rtol=0, atol=ATOL)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        torch.optim.AdamW(sparse.parameters()).step()


def test_the_memory_formula():
    ids = torch.tensor([40, 367, 2885, 40, 50256])
    assert F.one_hot(ids, num_classes=GPT2_VOCAB).float().nbytes == len(ids) * GPT2_VOCAB * 4
    assert F.one_hot(ids, num_classes=GPT2_VOCAB).nbytes == len(ids) * GPT2_VOCAB * 8  # int64 before .float()


def test_the_lookup_is_far_faster_than_the_one_hot_product(gpt2_ids):
    """The notebook measures thousands of times; 100x leaves room for a busy machine."""
    ids = torch.tensor(gpt2_ids[:64])
    torch.manual_seed(123)
    embedding = torch.nn.Embedding(GPT2_VOCAB, GPT2_DIM)

    def best(fn, repeats):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        lookup = best(lambda: embedding(ids), 50)
        product = best(lambda: F.one_hot(ids, num_classes=GPT2_VOCAB).float() @ embedding.weight, 3)
    assert 100 * lookup < product, (lookup, product)


# --- what the stored outputs show ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def nb() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def printed(nb) -> str:
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))


def test_conventions(nb, printed):
    ids = [c["id"] for c in nb["cells"]]
    assert ids == [f"embeddings-{i:02d}" for i in range(len(ids))]
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and first.startswith("# Chapter 2 bonus: ")
    mode = nb["metadata"]["llmfs"]["mode"]
    assert f"quick mode: {mode == 'quick'}" in printed
    if mode == "quick":
        assert "**Stored outputs: quick mode**" in first
    assert not any(o.get("output_type") == "error" for c in nb["cells"] for o in c.get("outputs", []))


def test_stored_outputs_show_the_books_numbers(nb):
    cells = nb["cells"]
    assert_shows(output_of(cells, "embedding_layer = torch.nn.Embedding(vocab_size, output_dim)"), flat(BOOK_WEIGHTS))
    looked_up = flat([BOOK_WEIGHTS[i] for i in BOOK_IDS])
    assert_shows(output_of(cells, "print(one_hot @ W)"), looked_up)
    assert_shows(output_of(cells, "print(linear(one_hot))"), looked_up)
    assert "[1, 2, 3, 5] | one_hot @ W [1, 2, 3, 5] | nn.Linear [1, 2, 3, 5]" in output_of(cells, "def three_gradients")
    assert_shows(output_of(cells, "repeated_ids = torch.tensor([2, 3, 5, 1, 3])"),
                 [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1])
    steps = output_of(cells, "def rows_changed_by_one_step")
    assert "SGD (lr=0.1) changes rows [1, 2, 3, 5]" in steps
    assert "changes rows [0, 1, 2, 3, 4, 5]" in steps


def test_every_stored_check_is_true(printed):
    checks = re.findall(r"(?:==[^:\n]*|equal gradients|the distinct ids|within atol=1e-4|allclose[^:\n]*): (\w+)",
                        printed)
    assert len(checks) == 16 and set(checks) == {"True"}, checks
    assert "False" not in printed.replace("quick mode: False", "")


def test_stored_figures_agree_with_the_formulas(nb, printed, gpt2_ids):
    cells = nb["cells"]
    m = re.search(r"(\d+) token ids \((\d+) distinct\), the first ten: (\[[\d, ]+\])", printed)
    n, distinct = int(m.group(1)), int(m.group(2))
    assert n == (128 if nb["metadata"]["llmfs"]["mode"] == "quick" else 1024)
    assert distinct == len(set(gpt2_ids[:n])) and json.loads(m.group(3)) == gpt2_ids[:10]

    memory = output_of(cells, "one_hot_bytes = NUM_TOKENS * GPT2_VOCAB * 4")
    assert f"{n:,} x {GPT2_VOCAB:,} x 4 = {n * GPT2_VOCAB * 4:,} bytes" in memory
    assert f"{n:,} x {GPT2_DIM} x 4 = {n * GPT2_DIM * 4:,} bytes" in memory
    assert f"{GPT2_VOCAB:,} x {GPT2_DIM} x 4 = {GPT2_VOCAB * GPT2_DIM * 4:,} bytes" in memory
    assert f"one-hot product: {n * GPT2_VOCAB * GPT2_DIM:,} multiply-adds" in printed

    gradients = output_of(cells, "def weight_gradient(name)")
    assert gradients.count(f"rows with a non-zero gradient: {distinct} of {GPT2_VOCAB:,}") == 3
    assert f"sparse gradient: {distinct} rows" in printed


def test_stored_times_name_the_machine_and_show_the_gap(nb, printed):
    for title in ("forward pass", "forward and backward"):
        assert re.search(rf"^{title}: .*\| CPU: .+ \| torch threads: \d+ \| torch \d", printed, re.M), title
    forward = output_of(nb["cells"], 'report("forward pass", forward_s)')
    ratios = [int(r.replace(",", "")) for r in re.findall(r"([\d,]+)x the lookup's time", forward)]
    assert len(ratios) == 2 and min(ratios) >= 100, ratios
