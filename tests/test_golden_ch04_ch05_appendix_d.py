"""The stored outputs of the chapter 4, chapter 5 and appendix D notebooks print the book's numbers.

Fast: nothing is executed; the outputs are read from the .ipynb JSON. The expected values are
the book's printed ones (same inputs, same seeds). Chapter 5's and appendix D's training numbers
exist only in a run at the book's full settings, so these notebooks must store a full-settings
run (recorded by `tests/nbexec.py --save --full` in the notebook's metadata); a quick-mode store
fails here instead of skipping the comparison.
"""

from __future__ import annotations

import json
import re

from nbexec import REPO

NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def outputs(rel: str) -> list[str]:
    """The text each code cell printed (stream and text/plain results), one string per code cell."""
    nb = json.loads((REPO / rel).read_text(encoding="utf-8"))
    texts = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        parts = []
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                parts.append("".join(out["text"]))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append("".join(out["data"]["text/plain"]))
        texts.append("".join(parts))
    return texts


def all_text(rel: str) -> str:
    return "\n".join(outputs(rel))


def cell_with(rel: str, marker: str) -> str:
    """The output of the first code cell whose output contains `marker`."""
    return next(text for text in outputs(rel) if marker in text)


def numbers_after(text: str, label: str, count: int) -> list[float]:
    """The first `count` numbers printed after `label` (skipping the '...' of a summarized tensor)."""
    start = text.index(label) + len(label)
    return [float(x) for x in re.findall(NUMBER, text[start:])[:count]]


def stored_in_quick_mode(rel: str) -> bool:
    text = all_text(rel)
    match = re.search(r"quick mode: (True|False)", text)
    assert match, f"{rel}: the first code cell prints the mode (`quick mode: ...`); no stored outputs?"
    return match.group(1) == "True"


def require_full_run(rel: str) -> None:
    """These notebooks exist to show the book's numbers: their stored outputs must be a full-settings run."""
    recorded = json.loads((REPO / rel).read_text(encoding="utf-8"))["metadata"].get("llmfs", {}).get("mode")
    assert recorded == "full" and not stored_in_quick_mode(rel), (
        f"{rel}: the stored outputs are not a full-settings run; re-run: python tests/nbexec.py --save --full {rel}")


def close(actual: list[float], expected: list[float], tol: float) -> bool:
    return len(actual) == len(expected) and all(abs(a - e) <= tol for a, e in zip(actual, expected))


# --- Chapter 4 --------------------------------------------------------------------------------

CH04 = "ch04/ch04.ipynb"


def test_ch04_is_stored_from_a_full_settings_run():
    assert not stored_in_quick_mode(CH04)
    first = json.loads((REPO / CH04).read_text(encoding="utf-8"))["cells"][0]
    assert first["cell_type"] == "markdown" and "full settings" in "".join(first["source"])


def test_ch04_dummy_model_logits():
    text = all_text(CH04)
    first_row = numbers_after(text, "Output shape: torch.Size([2, 4, 50257])\ntensor(", 6)
    assert close(first_row, [-1.2034, 0.3201, -0.7130, -1.5548, -0.2390, -0.4667], 2e-4), first_row


def test_ch04_layer_norm_statistics_use_the_unbiased_variance():
    text = all_text(CH04)
    out = numbers_after(cell_with(CH04, "ReluBackward0"), "tensor(", 12)
    assert close(out, [0.2260, 0.3470, 0.0000, 0.2216, 0.0000, 0.0000,
                       0.2133, 0.2394, 0.0000, 0.5198, 0.3297, 0.0000], 2e-4), out
    assert close(numbers_after(text, "Mean:\n", 2), [0.1324, 0.2170], 2e-4)
    assert close(numbers_after(text, "Variance:\n", 2), [0.0231, 0.0398], 2e-4)  # biased would be 0.0192, 0.0332


def test_ch04_shortcut_gradients():
    text = all_text(CH04)
    found = [float(x) for x in re.findall(r"layers\.\d\.0\.weight has gradient mean of (" + NUMBER + ")", text)]
    book = [0.00020173587836325169, 0.0001201116101583466, 0.0007152041653171182, 0.001398873864673078,
            0.005049646366387606,
            0.22169792652130127, 0.20694106817245483, 0.32896995544433594, 0.2665732502937317,
            1.3258541822433472]
    assert len(found) == len(book)
    assert all(abs(f - b) <= 1e-3 * abs(b) for f, b in zip(found, book)), found


def test_ch04_gpt_model_parameters_and_train_mode_logits():
    text = all_text(CH04)
    assert "Total number of parameters: 163,009,536" in text
    assert "Number of trainable parameters considering weight tying: 124,412,160" in text
    assert "Total size of the model: 621.83 MB" in text
    logits = numbers_after(cell_with(CH04, "Input batch:"), "Output shape: torch.Size([2, 4, 50257])\ntensor(", 24)
    book = [0.3613, 0.4222, -0.0711, 0.3483, 0.4661, -0.2838,
            -0.1792, -0.5660, -0.9485, 0.0477, 0.5181, -0.3168,
            0.7120, 0.0332, 0.1085, 0.1018, -0.4327, -0.2553,
            -1.0076, 0.3418, -0.1190, 0.7195, 0.4023, 0.0532]
    assert close(logits, book, 2e-4), logits


def test_ch04_generate_text_simple_tokens():
    text = all_text(CH04)
    assert close(numbers_after(text, "encoded:", 4), [15496, 11, 314, 716], 0)
    assert close(numbers_after(text, "Output: tensor(", 10),
                 [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267], 0)
    assert "Hello, I am Featureiman Byeswickattribute argue" in text


# --- Chapter 5 --------------------------------------------------------------------------------

CH05 = "ch05/ch05.ipynb"

# The book's log (train_model_simple, eval every 5 steps on 5 batches): step -> (train, val).
BOOK_LOG = {0: (9.781, 9.933), 5: (8.111, 8.339), 10: (6.661, 7.048), 15: (5.961, 6.616),
            55: (2.104, 6.134), 60: (1.882, 6.233), 65: (1.320, 6.238), 70: (0.985, 6.242),
            75: (0.717, 6.293), 80: (0.541, 6.393), 85: (0.391, 6.452)}


def test_ch05_numbers_that_do_not_depend_on_the_mode():
    text = all_text(CH05)
    assert "Characters: 20479\nTokens: 5145" in text
    # 5.3.1: the toy vocabulary, greedy and sampled choice, 1,000 seeded draws.
    assert "73 x closer\n0 x every\n0 x effort\n582 x forward\n2 x inches\n0 x moves\n0 x pizza\n343 x toward" in text
    # 5.3.2: top-k.
    assert close(numbers_after(text, "Top logits: tensor(", 3), [6.75, 6.28, 4.51], 1e-4)
    assert close(numbers_after(text, "Top positions: tensor(", 3), [3, 7, 0], 0)
    assert "tensor([0.0615, 0.0000, 0.0000, 0.5775, 0.0000, 0.0000, 0.0000, 0.3610, 0.0000])" in text


def test_ch05_full_run_untrained_model_and_losses():
    require_full_run(CH05)
    text = all_text(CH05)
    assert "Every effort moves you rentingetic wasnم refres RexMeCHicular stren" in text
    assert close(numbers_after(text, "Text 1: tensor(", 3), [7.4541e-05, 3.1061e-05, 1.1563e-05], 1e-8)
    assert close(numbers_after(text, "Text 2: tensor(", 3), [1.0337e-05, 5.6776e-05, 4.7559e-06], 1e-8)
    assert "tensor(-10.7940)" in text and "tensor(10.7940)" in text
    assert "tensor(48725.8203)" in text
    assert "Training tokens: 4608\nValidation tokens: 512" in text
    assert abs(numbers_after(text, "Training loss:", 1)[0] - 10.98758347829183) < 1e-4
    assert abs(numbers_after(text, "Validation loss:", 1)[0] - 10.98110580444336) < 1e-4


def test_ch05_full_run_training_log_and_samples():
    require_full_run(CH05)
    text = all_text(CH05)
    log = {int(step): (float(train), float(val)) for step, train, val in
           re.findall(r"Ep \d+ \(Step (\d+)\): Train loss (" + NUMBER + r"), Val loss (" + NUMBER + ")", text)}
    assert sorted(log) == list(range(0, 90, 5))
    for step, (train, val) in BOOK_LOG.items():
        assert abs(log[step][0] - train) <= 0.005 and abs(log[step][1] - val) <= 0.005, (step, log[step])
    final_sample = ('Every effort moves you know," was one of the axioms he laid down across the Sevres and silver '
                    'of an exquisitely appointed luncheon-table, when, on a later day, I had again run over from '
                    'Monte Carlo; and Mrs. Gis')
    assert final_sample in text
    assert ('Every effort moves you know," was one of the axioms he laid down across the Sevres and silver of an '
            'exquisitely appointed lun') in text  # 5.3: 25 greedy tokens
    assert "Every effort moves you stand to work on surprise, a one of us had gone with random-" in text
    assert "same tokens as the book's generate: True" in text


# --- Appendix D -------------------------------------------------------------------------------

APPENDIX_D = "appendix-D/appendix-D.ipynb"


def test_appendix_d_schedule_and_run():
    require_full_run(APPENDIX_D)
    text = all_text(APPENDIX_D)
    # 9 batches per epoch, 15 epochs: 27 warm-up steps, as printed in the book.
    assert "\n27\n" in f"\n{text}"
    run = cell_with(APPENDIX_D, " steps in ")
    log = re.findall(r"Ep \d+ \(Iter (\d+)\): Train loss (" + NUMBER + r"), Val loss (" + NUMBER + ")", run)
    assert log, "the D.4 run prints its losses"
    steps = [int(s) for s, _, _ in log]
    assert steps == list(range(0, steps[-1] + 1, 5))
    assert float(log[-1][1]) < float(log[0][1])  # the run trains
    assert "same learning rates, and the same losses until step 2, the first step after warm-up" in text
    # The two short runs' logs are each printed under a line saying whose they are.
    short = cell_with(APPENDIX_D, "same learning rates")
    assert short.index("Our train_model") < short.index("The book's train_model") < short.index("same learning")
    # The book's run: 15 epochs of 9 steps, warm-up 27 steps, peak 0.001.
    losses = {int(s): (float(t), float(v)) for s, t, v in log}
    assert steps[-1] == 130
    book = {0: (10.934, 10.939), 5: (9.151, 9.461), 10: (7.949, 8.184), 15: (6.362, 6.876)}
    for step, (train, val) in book.items():
        assert abs(losses[step][0] - train) <= 0.005 and abs(losses[step][1] - val) <= 0.005, (step, losses[step])
    # The notebook's book listing clips as printed (`global_step > warmup_steps`), so its log ends
    # where the book's does.
    assert losses[130] == (0.041, 6.915), losses[130]
    assert "final train loss 0.041, val loss 6.915" in text


def test_ch05_exercise_5_1_sampling_frequencies():
    """Exercise 5.1's answer: "pizza" is sampled 32 times in 1,000 at temperature 5, never at 1 or 0.1."""
    text = all_text("ch05/exercise-solutions.ipynb")
    runs = text.split("Temperature:")[1:]
    assert [run.split()[0] for run in runs] == ["1", "0.1", "5"]
    assert "0 x pizza" in runs[0] and "985 x forward" in runs[1] and "15 x toward" in runs[1]
    assert "32 x pizza" in runs[2]
    assert "p(pizza) at temperature 5: 0.0430" in text
