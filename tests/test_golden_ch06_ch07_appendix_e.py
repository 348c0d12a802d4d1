"""The stored outputs of the ch06, ch07 and appendix E notebooks show the book's numbers (fast: no execution).

These notebooks need OpenAI's pretrained GPT-2, which the project's machines cannot download, so their
stored outputs come from quick mode (a banner in the first cell says so). The numbers that do not depend
on the weights are the book's: the data counts and splits, padding lengths, batch counts and shapes, the
collate examples' tensors, the ignore-index losses and the LoRA parameter counts of GPT-2 small. Each is
checked here against the value printed in the book (rasbt/LLMs-from-scratch).
"""

from __future__ import annotations

import json
import re

import pytest

from nbexec import REPO


def stored_text(rel: str) -> str:
    """All stream and text/plain outputs of the notebook's code cells, in order.

    Consecutive chunks of one stream in a cell are one text, as Jupyter shows them (the kernel may
    send a cell's prints in one chunk or several)."""
    nb = json.loads((REPO / rel).read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        previous = None
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                if previous is not None and previous.get("output_type") == "stream" and previous.get("name") == out.get("name"):
                    parts[-1] += "".join(out["text"])
                else:
                    parts.append("".join(out["text"]))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append("".join(out["data"]["text/plain"]))
            previous = out
    return "\n".join(parts)


def first_cell(rel: str) -> str:
    nb = json.loads((REPO / rel).read_text(encoding="utf-8"))
    return "".join(nb["cells"][0]["source"])


def number_after(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s*(?:tensor\()?(-?[\d,]+(?:\.\d+)?)", text)
    assert match, f"no number after {label!r} in the stored outputs"
    return float(match.group(1).replace(",", ""))


def tensor_rows(text: str, label_regex: str) -> list[list[int]]:
    """The integer rows of the first printed 2-D tensor after `label_regex`."""
    match = re.search(label_regex + r".*?tensor\((\[\[.*?\]\])\)", text, re.S)
    assert match, f"no tensor after {label_regex!r}"
    return json.loads(re.sub(r"\s+", "", match.group(1)))


def all_tensors(text: str) -> list[list[list[int]]]:
    return [json.loads(re.sub(r"\s+", "", m)) for m in re.findall(r"tensor\((\[\[[-\d,\s\[\]]*\]\])\)", text)]


QUICK_NOTEBOOKS = ["ch06/ch06.ipynb", "ch07/ch07.ipynb", "appendix-E/appendix-E.ipynb"]


@pytest.mark.parametrize("rel", QUICK_NOTEBOOKS)
def test_banner_says_the_outputs_come_from_quick_mode_without_weights(rel):
    first = first_cell(rel).lower()
    assert "quick mode" in first and "pretrained" in first and "weights" in first


# --- chapter 6 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ch06() -> str:
    return stored_text("ch06/ch06.ipynb")


def test_ch06_data_counts_are_the_books(ch06):
    counts = re.findall(r"^(ham|spam)\s+(\d+)$", ch06, re.M)
    assert counts[:2] == [("ham", "4825"), ("spam", "747")]   # the raw data
    assert counts[2:4] == [("ham", "747"), ("spam", "747")]   # balanced
    assert re.search(r"^1045 149 300$", ch06, re.M)           # 70/10/20 split


def test_ch06_padding_and_loaders_are_the_books(ch06):
    assert "[50256]" in ch06
    assert re.search(r"^120$", ch06, re.M)                                # the longest training message
    assert "Input batch dimensions: torch.Size([8, 120])" in ch06
    assert "Label batch dimensions torch.Size([8])" in ch06
    assert re.search(r"^130 training batches\n19 validation batches\n38 test batches$", ch06, re.M)


def test_ch06_model_inputs_and_outputs_have_the_books_shapes(ch06):
    assert tensor_rows(ch06, r"Inputs:") == [[5211, 345, 423, 640]]
    assert "Inputs dimensions: torch.Size([1, 4])" in ch06
    assert "Outputs dimensions: torch.Size([1, 4, 2])" in ch06


def test_ch06_shows_the_books_reading_changes_predictions_with_padding(ch06):
    match = re.search(r"\[:, -1, :\] on 300 test messages: (\d+) predictions change", ch06)
    assert match and int(match.group(1)) > 0
    # Accuracies are printed three times (book's reading, ours, after training), each as a percentage.
    accuracies = [float(a) for a in re.findall(r"^Test accuracy: ([\d.]+)%$", ch06, re.M)]
    assert len(accuracies) == 3
    # Each is a count of right answers over a known number of messages, printed with two decimals: the
    # first two over num_batches=10 batches of 8, the last over the whole test set.
    n_test = int(re.search(r"on (\d+) test messages", ch06).group(1))
    for accuracy, n in zip(accuracies, (80, 80, n_test)):
        correct = accuracy / 100 * n
        assert abs(correct - round(correct)) <= 0.005 / 100 * n + 1e-9, (accuracy, n)
    assert accuracies[2] > max(accuracies[:2])  # fine-tuning beats both readings of the untrained head
    assert f"reloaded model, same test accuracy: {accuracies[2]:.2f}%" in ch06


# --- chapter 7 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ch07() -> str:
    return stored_text("ch07/ch07.ipynb")


def test_ch07_data_and_split_are_the_books(ch07):
    assert number_after(ch07, "Number of entries:") == 1100
    assert number_after(ch07, "Training set length:") == 935
    assert number_after(ch07, "Validation set length:") == 55
    assert number_after(ch07, "Test set length:") == 110


def test_ch07_collate_examples_are_the_books(ch07):
    tensors = all_tensors(ch07)
    inputs = [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    targets_draft_2 = [[1, 2, 3, 4, 50256], [6, 50256, 50256, 50256, 50256], [8, 9, 50256, 50256, 50256]]
    targets = [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    # draft 1; draft 2 (inputs, targets); the book's custom_collate_fn; ours
    assert tensors[:7] == [inputs, inputs, targets_draft_2, inputs, targets, inputs, targets]


def test_ch07_ignore_index_losses_are_the_books(ch07):
    losses = [float(x) for x in re.findall(r"^tensor\((\d\.\d+)\)$", ch07, re.M)]
    assert losses[:3] == pytest.approx([1.1269, 0.7936, 1.1269], abs=1e-4)
    assert "loss_1 == loss_3: tensor(True)" in ch07


def test_ch07_first_batches_have_the_books_shapes(ch07):
    shapes = re.findall(r"^torch\.Size\(\[8, (\d+)\]\) torch\.Size\(\[8, \1\]\)$", ch07, re.M)
    assert [int(s) for s in shapes[:6]] == [61, 76, 73, 68, 65, 72]


# --- appendix E --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def appendix_e() -> str:
    return stored_text("appendix-E/appendix-E.ipynb")


def test_appendix_e_parameter_counts_are_the_books(appendix_e):
    assert number_after(appendix_e, "Total trainable parameters before:") == 124_441_346
    assert number_after(appendix_e, "Total trainable parameters after:") == 0
    assert number_after(appendix_e, "Total trainable LoRA parameters:") == 2_666_528


def test_appendix_e_loaders_are_the_books(appendix_e):
    assert re.search(r"^130 training batches\n19 validation batches\n38 test batches$", appendix_e, re.M)


def test_the_checks_can_fail():
    """A wrong number in the outputs is caught: a check above fails on doctored outputs, passes on the right ones."""
    with pytest.raises(AssertionError):
        number_after("Number of entries: 1100", "Test set length:")
    assert number_after("Training set length: 935", "Training set length:") == 935
    assert number_after("Total trainable LoRA parameters: 2,666,528", "Total trainable LoRA parameters:") == 2_666_528
    right = "Number of entries: 1100\nTraining set length: 935\nValidation set length: 55\nTest set length: 110\n"
    test_ch07_data_and_split_are_the_books(right)
    with pytest.raises(AssertionError):
        test_ch07_data_and_split_are_the_books(right.replace("935", "936"))
    assert all_tensors("tensor([[1, 2],\n        [3, -100]])") == [[[1, 2], [3, -100]]]
