"""ch02/dataloader-intuition/dataloader-intuition.ipynb: the chapter's data loader on the numbers 0 ... 999.

Recomputes the notebook's claims with `ch02.dataloader` and the notebook's own `NumberTokenizer` (taken from
the notebook's source): the number of windows against (N - max_length - 1) // stride + 1, the window starts,
the targets being the inputs shifted by one, the batch counts with and without `drop_last`, how often each
number is a target, and seeded shuffling. Then reads the stored outputs and checks they show the same.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter

import pytest
import torch

from ch02.dataloader import GPTDatasetV1, create_dataloader_v1
from nbexec import REPO

NOTEBOOK = REPO / "ch02" / "dataloader-intuition" / "dataloader-intuition.ipynb"
N = 1000
TEXT = " ".join(str(i) for i in range(N))
PAIRS = [(1, 1), (4, 1), (4, 2), (4, 3), (4, 4), (4, 5), (8, 3), (16, 16), (256, 128), (256, 256), (999, 1)]


def cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def output_of(source_line: str) -> str:
    """The stored text output of the one code cell whose source contains `source_line`."""
    found = [c for c in cells() if c["cell_type"] == "code" and source_line in source(c)]
    assert len(found) == 1, f"{len(found)} code cells contain {source_line!r}"
    return "".join("".join(out.get("text", "")) for out in found[0]["outputs"])


def notebook_definition(name: str) -> str:
    """The source of the top-level class or function `name`, as the notebook defines it."""
    for cell in cells():
        if cell["cell_type"] != "code":
            continue
        for node in ast.parse(source(cell)).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
                return ast.get_source_segment(source(cell), node)
    raise AssertionError(f"the notebook defines no {name}")


@pytest.fixture(scope="module")
def tokenizer():
    namespace: dict = {}
    exec(notebook_definition("NumberTokenizer"), namespace)  # the notebook's few lines, nothing else
    return namespace["NumberTokenizer"]()


def formula(n_tokens: int, max_length: int, stride: int) -> int:
    return (n_tokens - max_length - 1) // stride + 1 if n_tokens >= max_length + 1 else 0


def numbers(n_tokens: int) -> str:
    return " ".join(str(i) for i in range(n_tokens))


# --- the claims, recomputed with the chapter's code ------------------------------------------------------

def test_the_tokenizer_maps_each_number_to_itself(tokenizer):
    assert tokenizer.encode(TEXT) == list(range(N))
    assert tokenizer.encode(TEXT, allowed_special={"<|endoftext|>"}) == list(range(N))  # as GPTDatasetV1 calls it
    assert tokenizer.decode([3, 14, 159]) == "3 14 159"


def test_the_notebook_uses_the_chapters_loader_not_a_copy():
    code = "\n".join(source(c) for c in cells() if c["cell_type"] == "code")
    assert "from ch02.dataloader import GPTDatasetV1, create_dataloader_v1" in code
    assert "class GPTDatasetV1" not in code and "def create_dataloader_v1" not in code


def test_the_notebooks_formula_is_this_one():
    namespace: dict = {}
    exec(notebook_definition("num_windows"), namespace)
    for n_tokens, max_length, stride in [(1000, 4, 4), (5, 4, 1), (4, 4, 1), (17, 16, 3), (100, 7, 9)]:
        assert namespace["num_windows"](n_tokens, max_length, stride) == formula(n_tokens, max_length, stride)


@pytest.mark.parametrize("n_tokens", [17, 100, N])
@pytest.mark.parametrize("max_length,stride", PAIRS)
def test_window_count_starts_and_shift(tokenizer, n_tokens, max_length, stride):
    if n_tokens < max_length + 1:
        with pytest.raises(ValueError, match=f"has {n_tokens} tokens"):
            GPTDatasetV1(numbers(n_tokens), tokenizer, max_length, stride)
        return
    dataset = GPTDatasetV1(numbers(n_tokens), tokenizer, max_length, stride)
    assert len(dataset) == formula(n_tokens, max_length, stride)
    # Window k starts at k * stride and counts up; its targets are the same window moved one to the right.
    starts = torch.arange(len(dataset)) * stride
    assert torch.equal(dataset.input_ids, starts[:, None] + torch.arange(max_length))
    assert torch.equal(dataset.target_ids, dataset.input_ids + 1)
    assert torch.equal(dataset.target_ids[:, :-1], dataset.input_ids[:, 1:])
    # The last window is the last that fits, and one more stride would not.
    assert dataset.target_ids[-1, -1] <= n_tokens - 1 < dataset.target_ids[-1, -1] + stride


@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 2), (4, 4), (3, 5)])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batches_and_drop_last(tokenizer, max_length, stride, batch_size):
    windows = formula(N, max_length, stride)
    kept = create_dataloader_v1(TEXT, batch_size=batch_size, max_length=max_length, stride=stride, shuffle=False,
                                tokenizer=tokenizer)
    every = create_dataloader_v1(TEXT, batch_size=batch_size, max_length=max_length, stride=stride, shuffle=False,
                                 drop_last=False, tokenizer=tokenizer)
    assert len(kept) == windows // batch_size and len(every) == -(-windows // batch_size)
    rows = [inputs for inputs, _ in every]
    assert rows[-1].shape[0] == (windows % batch_size or batch_size)
    for b, (inputs, targets) in enumerate(kept):
        assert inputs.shape == targets.shape == (batch_size, max_length)
        assert inputs[:, 0].tolist() == [(b * batch_size + r) * stride for r in range(batch_size)]
        assert torch.equal(targets, inputs + 1)


def test_how_often_each_number_is_a_target(tokenizer):
    spreads = {}
    for stride in (1, 2, 4, 5):
        dataset = GPTDatasetV1(TEXT, tokenizer, max_length=4, stride=stride)
        spreads[stride] = Counter(torch.bincount(dataset.target_ids.flatten(), minlength=N).tolist())
    assert spreads[1] == {4: 993, 3: 2, 2: 2, 1: 2, 0: 1}  # 0 never; 1 and 999 once; 2 and 998 twice; ...
    assert spreads[2] == {2: 994, 1: 4, 0: 2}
    assert spreads[4] == {1: 996, 0: 4}  # back to back: each number once, except 0 and the unused 997 ... 999
    assert spreads[5] == {1: 800, 0: 200}  # gaps: every fifth number is never predicted


def test_seeded_shuffling_permutes_whole_windows(tokenizer):
    def loader(seed, drop_last=True):
        return create_dataloader_v1(TEXT, batch_size=8, max_length=4, stride=4, shuffle=True, drop_last=drop_last,
                                    tokenizer=tokenizer, generator=torch.Generator().manual_seed(seed))

    first = next(iter(loader(123)))
    assert torch.equal(first[0], next(iter(loader(123)))[0])
    assert not torch.equal(first[0], next(iter(loader(456)))[0])
    all_starts = list(range(0, N - 4, 4))
    every = torch.cat([inputs for inputs, _ in loader(123, drop_last=False)])
    assert sorted(every[:, 0].tolist()) == all_starts  # each window once per epoch
    assert every[:, 0].tolist() != all_starts
    assert torch.equal(every, every[:, :1] + torch.arange(4))  # no window is shuffled inside
    repeated = loader(123)
    left_out = [set(all_starts) - set(torch.cat([x[:, 0] for x, _ in repeated]).tolist()) for _ in range(3)]
    assert all(len(s) == 249 % 8 for s in left_out)
    epochs = [torch.cat([x[:, 0] for x, _ in repeated]).tolist() for _ in range(2)]
    assert epochs[0] != epochs[1]  # each epoch draws a new order


# --- the stored outputs show the same ------------------------------------------------------------------

def test_stored_outputs_come_from_quick_mode():
    first = source(cells()[0])
    assert first.startswith("# Chapter 2 bonus:") and "**Stored outputs: quick mode**" in first
    assert "quick mode: True" in output_of("QUICK = is_quick()")
    meta = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["metadata"]["llmfs"]
    assert meta["mode"] == "quick"


def test_every_printed_check_is_true():
    shown = "\n".join("".join(out.get("text", "")) for c in cells() if c["cell_type"] == "code" for out in c["outputs"])
    checks = re.findall(r"(?<!quick mode): (True|False)\b", shown)
    assert len(checks) == 19 and set(checks) == {"True"}, checks


def test_stored_first_batches_show_the_shift():
    text = output_of("second_batch = next(data_iter)")
    assert "[tensor([[0, 1, 2, 3]]), tensor([[1, 2, 3, 4]])]" in text
    assert "[tensor([[1, 2, 3, 4]]), tensor([[2, 3, 4, 5]])]" in text
    tasks = re.findall(r"^\[([\d, ]+)\] ----> (\d+)$", output_of('"---->"'), re.M)
    assert [(list(map(int, ctx.split(", "))), int(nxt)) for ctx, nxt in tasks] == \
        [(list(range(j + 1)), j + 1) for j in range(4)]


def test_stored_window_counts_match_the_formula_and_the_dataset(tokenizer):
    text = output_of("equal: {len(dataset) == formula}")
    rows = re.findall(r"max_length=\s*(\d+), stride=\s*(\d+): len\(dataset\) =\s*(\d+), \((\d+) - (\d+) - 1\) // "
                      r"(\d+) \+ 1 =\s*(\d+), equal: True \| last window starts at (\d+), last target (\d+), "
                      r"unused at the end: (\d+)", text)
    assert len(rows) == 7 == text.count("max_length=")
    pairs = set()
    for row in rows:
        max_length, stride, shown, n, m, s, by_formula, last_start, last_target, unused = map(int, row)
        assert (n, m, s) == (N, max_length, stride)
        dataset = GPTDatasetV1(TEXT, tokenizer, max_length, stride)
        assert shown == by_formula == formula(N, max_length, stride) == len(dataset)
        assert last_start == (by_formula - 1) * stride and last_target == last_start + max_length
        assert unused == N - 1 - last_target
        pairs.add((max_length, stride))
    assert {(4, 1), (4, 2), (4, 4)} <= pairs  # overlap, half overlap, back to back


def test_stored_stride_table_and_target_counts():
    text = output_of("windows 0 and 1 share")
    for stride in (1, 2, 4, 5):
        windows = formula(N, 4, stride)
        first_four = [[k * stride + j for j in range(4)] for k in range(4)]
        assert (f"stride={stride}: {windows} windows, first four {first_four}, "
                f"windows 0 and 1 share {max(4 - stride, 0)} ids") in text
    counts = output_of("times[k]: how often k is a target")
    assert "stride=1: {times a target: how many numbers} = {0: 1, 1: 2, 2: 2, 3: 2, 4: 993}" in counts
    assert "stride=4: {times a target: how many numbers} = {0: 4, 1: 996}, never a target: [0, 997, 998, 999]" \
        in counts
    assert "stride=5: {times a target: how many numbers} = {0: 200, 1: 800}" in counts


def test_stored_exhaustive_check_covers_the_quick_grid():
    text = output_of("mismatches: {mismatches}")
    m = re.search(r"(\d+) \(N, max_length, stride\) combinations, max_length and stride 1 to (\d+): "
                  r"formula, starts and shift all agree: True, mismatches: \[\]", text)
    assert m and int(m.group(2)) == 16 and int(m.group(1)) == 3 * 16 * 16
    assert "the text has 4 tokens, but a window of max_length=4 needs at least 5" in text


def test_stored_batches_and_drop_last():
    text = output_of("for drop_last in (True, False):")
    windows = formula(N, 4, 4)
    assert (f"drop_last=True: len(loader) = {windows // 8} batches ({windows} windows // 8 = {windows // 8}, "
            f"rounded up {windows // 8 + 1}), last batch (8, 4)") in text
    assert f"drop_last=False: len(loader) = {windows // 8 + 1} batches" in text
    assert "last batch (1, 4), its windows start at [992]" in text
    batch = output_of('print("Inputs:\\n", inputs)')
    assert re.sub(r"\s+", " ", "[[ 0, 1, 2, 3], [ 4, 5, 6, 7],") in re.sub(r"\s+", " ", batch)


def test_stored_shuffled_batch_is_whole_windows_and_epochs_differ():
    text = output_of("def shuffled_loader(seed):")
    rows = [list(map(int, r.split(","))) for r in re.findall(r"\[\s*(\d+,\s*\d+,\s*\d+,\s*\d+)\]", text)]
    assert len(rows) == 8
    starts = [r[0] for r in rows]
    assert all(r == [r[0] + j for j in range(4)] for r in rows) and all(s % 4 == 0 for s in starts)
    assert starts != sorted(starts)
    epochs = re.findall(r"epoch (\d): first windows start at (\[[\d, ]+\]), (\d+) windows, each at most once: True, "
                        r"left out by drop_last: (\[[\d, ]*\])", output_of("each at most once"))
    assert [int(e[0]) for e in epochs] == [0, 1, 2]
    assert json.loads(epochs[0][1]) == starts[:6]  # the first epoch starts with the batch shown above
    assert {int(e[2]) for e in epochs} == {(249 // 8) * 8}
    assert len({e[1] for e in epochs}) == 3 and all(len(json.loads(e[3])) == 249 % 8 for e in epochs)
