"""Tests for ch06/experiments (the book's additional classification experiments) and the switches
`python -m ch06.gpt_class_finetune` gained for them: the trainable-parameter counts of every layer
choice against a formula from the config, the pooled variants (shapes, padding ignored), the causal
mask switch, the loss's ignore index, the grid end to end on a tiny model, the command line (switches
reach the run, bad values are one line), and the notebook's stored table against a recomputation."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ch04.gpt import GPT_CONFIG_124M, GPTModel
from ch06.cli import (
    QUICK_CLASSIFIER_CONFIG,
    QUICK_SETTINGS,
    experiment_from_args,
    main,
    parser,
    settings_from_args,
)
from ch06.experiments.additional_experiments import (
    BOOK_RESULTS,
    GRID,
    TRAINABLE_LAYERS,
    Experiment,
    calc_loss_batch,
    classifier_logits,
    count_trainable_parameters,
    final_hidden_states,
    load_experiment_classifier,
    pool_embeddings,
    run_grid,
    set_causal_mask,
    trainable_parameter_formula,
)
from ch06.gpt_class_finetune import PAD_TOKEN_ID
from llmfs.errors import InvalidInput
from nbexec import REPO

TINY = {**GPT_CONFIG_124M, "vocab_size": 100, "context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 3,
        "drop_rate": 0.0}
PAD = 99  # the tiny vocabulary's pad id


def tiny_classifier(experiment: Experiment, cfg=TINY) -> GPTModel:
    torch.manual_seed(123)
    model = GPTModel(cfg)
    experiment.prepare_classifier(model)
    return model.eval()


# --- which layers train ---------------------------------------------------------------------------

@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("layers", TRAINABLE_LAYERS)
def test_each_trainable_layers_choice_trains_exactly_the_formula_count(layers, qkv_bias):
    cfg = {**TINY, "qkv_bias": qkv_bias}
    model = tiny_classifier(Experiment(trainable_layers=layers, lora_rank=3, pad_token_id=PAD), cfg)
    assert count_trainable_parameters(model) == trainable_parameter_formula(cfg, layers, lora_rank=3)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if layers == "lora":
        assert trainable and all(name.endswith((".lora.A", ".lora.B")) for name in trainable)
        assert "out_head.lora.A" in trainable  # the new head is adapted too, as in the book
    elif layers != "all":
        assert {"out_head.weight", "out_head.bias"} <= trainable
        assert not any(name.startswith("trf_blocks.0.") for name in trainable)
        assert any(name.startswith("trf_blocks.1.") for name in trainable) == (layers == "last_two_blocks")
        assert any(name.startswith("trf_blocks.2.") for name in trainable) == (layers != "last_layer")


def test_the_formula_matches_the_books_lora_count_for_gpt2_small():
    """Appendix E prints 2,666,528 trainable LoRA parameters for GPT-2 small with rank 16."""
    gpt2_small = {**GPT_CONFIG_124M, "context_length": 1024, "qkv_bias": True}
    assert trainable_parameter_formula(gpt2_small, "lora", lora_rank=16) == 2_666_528


# --- which token feeds the head ---------------------------------------------------------------------

def padded(rows: list[list[int]], length: int) -> torch.Tensor:
    return torch.tensor([row + [PAD] * (length - len(row)) for row in rows])


@pytest.mark.parametrize("pos", ["last", "first", "average", "max"])
def test_token_choices_give_documented_shapes_and_ignore_appended_padding(pos):
    model = tiny_classifier(Experiment(trainable_token_pos=pos, pad_token_id=PAD))
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    short, long = padded(rows, 6), padded(rows, 14)
    with torch.no_grad():
        logits = classifier_logits(model, short, pos, PAD)
        assert logits.shape == (3, 2)  # (b, num_classes)
        torch.testing.assert_close(classifier_logits(model, long, pos, PAD), logits)
        # also when the padding runs through the model (trim=False, as without the causal mask)
        torch.testing.assert_close(classifier_logits(model, long, pos, PAD, trim=False), logits)
        if pos in ("average", "max"):
            hidden = final_hidden_states(model, long)
            assert hidden.shape == (3, 14, TINY["emb_dim"])  # (b, num_tokens, emb_dim)
            pooled = pool_embeddings(hidden, torch.tensor([3, 6, 1]), pos)
            assert pooled.shape == (3, TINY["emb_dim"])  # (b, emb_dim)
            # each row alone, without any padding: the same pooled vector
            for i, row in enumerate(rows):
                alone = final_hidden_states(model, torch.tensor([row]))[0]  # (len, emb_dim)
                expected = alone.mean(0) if pos == "average" else alone.amax(0)
                torch.testing.assert_close(pooled[i], expected)


def test_first_and_last_read_different_positions():
    model = tiny_classifier(Experiment(pad_token_id=PAD))
    ids = padded([[5, 6, 7], [8, 9]], 4)
    with torch.no_grad():
        per_token = model(ids)  # (b, num_tokens, num_classes)
        torch.testing.assert_close(classifier_logits(model, ids, "first", PAD), per_token[:, 0])
        torch.testing.assert_close(classifier_logits(model, ids, "last", PAD), per_token[[0, 1], [2, 1]])


# --- the causal mask ----------------------------------------------------------------------------------

@pytest.mark.parametrize("use_sdpa", [True, False])
def test_disabling_the_causal_mask_lets_position_0_see_later_tokens(use_sdpa):
    cfg = {**TINY, "use_sdpa": use_sdpa}
    masked = tiny_classifier(Experiment(pad_token_id=PAD), cfg)
    unmasked = tiny_classifier(Experiment(disable_causal_mask=True, pad_token_id=PAD), cfg)
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 50]])  # differ only at position 3
    with torch.no_grad():
        torch.testing.assert_close(masked(a)[:, 0], masked(b)[:, 0])          # causal: position 0 sees token 0 only
        assert not torch.allclose(unmasked(a)[:, 0], unmasked(b)[:, 0])      # no mask: it sees position 3
        set_causal_mask(unmasked, enabled=True)
        torch.testing.assert_close(unmasked(a), masked(a))


# --- ignore_index ---------------------------------------------------------------------------------

def test_targets_equal_to_the_ignore_index_do_not_count():
    model = tiny_classifier(Experiment(trainable_layers="all", pad_token_id=PAD)).train()
    ids = padded([[5, 6, 7], [8, 9], [10, 11, 12, 13], [3]], 5)
    targets = torch.tensor([0, 1, PAD, PAD])  # the last two rows' targets are "padding"
    loss = calc_loss_batch(ids, targets, model, "cpu", ignore_index=PAD, pad_token_id=PAD)
    torch.testing.assert_close(loss, calc_loss_batch(ids[:2], targets[:2], model, "cpu", pad_token_id=PAD))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calc_loss_batch(ids[:2], targets[:2], model, "cpu", pad_token_id=PAD).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)
    # class targets are 0 or 1: an ignore index of 50256 changes nothing (the book's row 15)
    real = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(calc_loss_batch(ids, real, model, "cpu", ignore_index=PAD_TOKEN_ID, pad_token_id=PAD),
                               calc_loss_batch(ids, real, model, "cpu", pad_token_id=PAD))


@pytest.mark.parametrize("kwargs, message", [
    ({"ignore_index": 1}, "is a class label"),
    ({"trainable_layers": "everything"}, "trainable_layers must be"),
    ({"trainable_token_pos": "middle"}, "trainable_token_pos must be"),
    ({"context_length": 0}, "context_length must be"),
    ({"trainable_layers": "lora", "lora_rank": 0}, "LoRA needs rank"),
])
def test_experiment_refuses_bad_values(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        Experiment(**kwargs)


# --- the grid end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    cfg = {**QUICK_CLASSIFIER_CONFIG, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "context_length": 64,
           "drop_rate": 0.0}
    settings = {**QUICK_SETTINGS, "num_epochs": 1, "max_length": None, "eval_freq": 100, "eval_iter": 1}
    out = tmp_path_factory.mktemp("grid")
    return cfg, out, run_grid(settings, out, mode="scratch", cfg=cfg, train_rows=16, device="cpu")


def test_the_grid_runs_end_to_end_on_a_tiny_model(tiny_grid):
    cfg, out, table = tiny_grid
    assert list(table["book row"]) == [row if row is not None else "-" for row, _ in GRID]
    for (_, experiment), params in zip(GRID, table["trainable parameters"]):
        assert params == trainable_parameter_formula(cfg, experiment.trainable_layers, lora_rank=experiment.lora_rank)
    assert table[["train acc", "val acc", "test acc"]].stack().between(0, 100).all()
    # max_length: the longest of the 16 training messages (truncated to 64), or the model's 64 tokens
    lengths = dict(zip(table["book row"], table["max_length"]))
    assert lengths[11] == 64 and 1 <= lengths[1] <= 64
    # class targets are never 50256: the ignore_index row trains exactly as row 1; and padding to the
    # model's context changes nothing either (last real token, causal mask, padding columns trimmed)
    accs = {r: list(table[table["book row"] == r].iloc[0][["train acc", "val acc", "test acc"]]) for r in (1, 11, 15)}
    assert accs[1] == accs[15] == accs[11]


def test_a_saved_experiment_classifier_reloads_with_its_switches(tiny_grid):
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch06.experiments.additional_experiments import calc_accuracy_loader
    from ch06.gpt_class_finetune import create_spam_loaders

    _, out, table = tiny_grid
    for i, (_, experiment) in enumerate(GRID):
        if experiment.disable_causal_mask or experiment.trainable_layers == "lora":
            folder = out / f"row-{i:02d}"
            model, meta, loaded = load_experiment_classifier(folder / "review_classifier.pth")
            assert loaded.disable_causal_mask == experiment.disable_causal_mask
            assert not any("lora" in name for name in model.state_dict())  # merged into plain layers
            paths = {name: folder / f"{name}-slice.csv" for name in ("train", "validation", "test")}
            test_loader = create_spam_loaders(paths, get_gpt2_tokenizer(), max_length=meta["max_length"])[2]
            accuracy = calc_accuracy_loader(test_loader, model, "cpu", trainable_token_pos=loaded.trainable_token_pos)
            assert round(100 * accuracy, 2) == table.iloc[i]["test acc"]


# --- the command line ---------------------------------------------------------------------------

def experiment_of(argv):
    args = parser().parse_args(argv)
    mode, settings = settings_from_args(args)
    return mode, settings, experiment_from_args(args, settings)


def test_without_experiment_switches_the_chapters_run_is_unchanged():
    mode, settings, experiment = experiment_of([])
    assert experiment is None and mode == "pretrained" and settings["trainable"] == "last_block"


def test_the_switches_build_the_experiment():
    _, settings, e = experiment_of(["--trainable-layers", "lora", "--lora-rank", "16", "--lora-alpha", "16",
                                    "--trainable-token-pos", "max", "--context-length", "model_context_length",
                                    "--disable-causal-mask", "--pad-token-id", "0", "--ignore-index", "50256"])
    assert e == Experiment(trainable_layers="lora", lora_rank=16, lora_alpha=16, trainable_token_pos="max",
                           context_length="model_context_length", disable_causal_mask=True, pad_token_id=0,
                           ignore_index=50256)
    assert settings["trainable"] == "lora"
    _, settings, e = experiment_of(["--quick", "--average-embeddings", "--context-length", "40"])
    assert e.trainable_token_pos == "average" and e.trainable_layers == "all" and settings["max_length"] == 40
    _, settings, e = experiment_of(["--quick", "--trainable", "head", "--context-length", "longest_training_example"])
    assert e.trainable_layers == "last_layer" and settings["max_length"] is None
    mode, _, _ = experiment_of(["--weights", "random", "--model-size", "gpt2-medium (355M)"])
    assert mode == "scratch" and parser().parse_args(["--model-size", "gpt2-xl"]).model == "gpt2-xl"


def test_the_switches_reach_the_run(tmp_path, monkeypatch):
    import ch06.cli as cc

    seen = {}
    monkeypatch.setattr(cc, "finetune", lambda settings, output_dir, **kw: seen.update(settings=settings, **kw))
    assert main(["--quick", "--output-dir", str(tmp_path), "--trainable-layers", "last_two_blocks",
                 "--trainable-token-pos", "first", "--disable-causal-mask", "--context-length", "50"]) == 0
    assert seen["experiment"] == Experiment(trainable_layers="last_two_blocks", trainable_token_pos="first",
                                            disable_causal_mask=True, context_length=50)
    assert seen["settings"]["trainable"] == "last_two_blocks" and seen["settings"]["max_length"] == 50
    assert main(["--quick", "--output-dir", str(tmp_path), "--overwrite"]) == 0
    assert seen["experiment"] is None and seen["settings"] == QUICK_SETTINGS


@pytest.mark.parametrize("args, message", [
    (["--trainable-layers", "some"], "invalid choice"),
    (["--trainable-token-pos", "middle"], "invalid choice"),
    (["--context-length", "longest"], "expected longest_training_example"),
    (["--context-length", "0"], "expected longest_training_example"),
    (["--pad-token-id", "50257"], "from 0 to 50256"),
    (["--lora-rank", "0", "--trainable-layers", "lora"], "whole number"),
    (["--trainable", "all", "--trainable-layers", "lora"], "give one of them"),
    (["--max-length", "40", "--context-length", "50"], "give one of them"),
    (["--average-embeddings", "--trainable-token-pos", "first"], "give one of them"),
    (["--lora-rank", "4"], "only apply to --trainable-layers lora"),
    (["--ignore-index", "0"], "is a class label"),
    (["--weights", "pretrained"], "contradicts"),
    (["--context-length", "500"], "exceeds the model's context length"),
])
def test_bad_switches_are_one_line_before_any_work(args, message, tmp_path, capsys):
    try:
        rc = main(["--quick", "--output-dir", str(tmp_path / "out"), "--no-progress", *args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in err, err
    assert not (tmp_path / "out" / "review_classifier.pth").exists()
    assert not (tmp_path / "out" / "train.csv").exists() or "exceeds" in message  # the data comes before the model


# --- the notebook's stored table ------------------------------------------------------------------

NOTEBOOK = "ch06/experiments/additional-experiments.ipynb"


def stored_text(rel: str) -> str:
    nb = json.loads((REPO / rel).read_text(encoding="utf-8"))
    return "\n".join("".join(out["text"]) for cell in nb["cells"] if cell["cell_type"] == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def stored_grid() -> list[dict]:
    """The quick-mode grid as printed by the notebook (`to_string(index=False)`), one dict per row."""
    text = stored_text(NOTEBOOK)
    block = text.split("QUICK-MODE GRID\n", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = []
    for line in block[1:]:
        parts = line.split()
        numbers = [float(x) for x in parts[-7:]]
        rows.append({"book row": parts[0], "experiment": " ".join(parts[1:-7]), "trainable parameters": numbers[0],
                     "max_length": numbers[1], "train acc": numbers[2], "val acc": numbers[3],
                     "test acc": numbers[4]})
    return rows


def test_the_notebooks_stored_table_agrees_with_a_recomputation(tmp_path):
    rows = stored_grid()
    assert len(rows) == len(GRID)
    for row, (book_row, experiment) in zip(rows, GRID):
        assert row["book row"] == (str(book_row) if book_row is not None else "-")
        assert row["experiment"] == experiment.label
        assert row["trainable parameters"] == trainable_parameter_formula(
            QUICK_CLASSIFIER_CONFIG, experiment.trainable_layers, lora_rank=experiment.lora_rank)
    by_row = {r["book row"]: [r[c] for c in ("train acc", "val acc", "test acc")] for r in rows}
    assert by_row["1"] == by_row["15"] == by_row["11"]
    # the cheapest row again, as the notebook ran it (quick settings: one CPU thread, fixed seed)
    from ch06.experiments.additional_experiments import QUICK_GRID_SETTINGS, QUICK_TRAIN_ROWS

    index = next(i for i, (r, _) in enumerate(GRID) if r == 3)
    table = run_grid(QUICK_GRID_SETTINGS, tmp_path, [GRID[index]], mode="quick", train_rows=QUICK_TRAIN_ROWS,
                     device="cpu")
    for column in ("train acc", "val acc", "test acc"):
        assert table.iloc[0][column] == rows[index][column], column
    # the book's table beside it is the README's
    text = stored_text(NOTEBOOK)
    for row in BOOK_RESULTS:
        assert re.search(rf"^\s*{row[0]}\s+{re.escape(row[1])}\s+{row[2]}\b.*\b{row[8]:.2f}\b", text, re.M), row
