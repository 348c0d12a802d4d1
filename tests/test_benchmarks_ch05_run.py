"""benchmarks.ch05_run runs both sides of the chapter-5 run (the book's script from our listings, and
`python -m ch05.gpt_train`) in quick mode, each in its own process, and writes a well-formed report in
which both sides end at the same losses. No timing assertions."""

import json
import re

import pytest

from benchmarks import ch05_run as bench
from ch05.cli import train_parser, train_settings


@pytest.mark.parametrize("quick", [False, True])
def test_our_command_line_runs_the_book_sides_settings(quick):
    cfg, hparams = bench.settings_for(quick, epochs=None)
    argv = bench.ours_argv({"quick": quick, "out_dir": "unused"})
    ours_cfg, ours = train_settings(train_parser().parse_args(argv))
    assert ours_cfg == cfg
    for key in ("learning_rate", "weight_decay", "batch_size", "num_epochs", "eval_freq", "eval_iter", "seed",
                "train_ratio", "start_context"):
        assert ours[key] == hparams[key], key
    if not quick:  # the book's gpt_train.py settings
        assert (cfg["context_length"], cfg["emb_dim"], cfg["n_layers"], hparams["num_epochs"]) == (256, 768, 12, 10)
    _, short = train_settings(train_parser().parse_args(bench.ours_argv({"quick": quick, "out_dir": "x",
                                                                         "epochs": 1})))
    assert short["num_epochs"] == bench.settings_for(quick, epochs=1)[1]["num_epochs"] == 1


def test_quick_benchmark_runs_both_sides_to_the_same_losses(tmp_path):
    out = tmp_path / "out"
    assert bench.main(["--quick", "--epochs", "1", "--threads", "1", "--out", str(out)]) == 0
    table = (out / "ch05_run.md").read_text()
    block = re.search(r"(\|[^\n]+\|\n\|[-:| ]+\|\n(?:\|[^\n]+\|\n)+)", table).group(1)
    rows = block.strip().splitlines()
    assert len({row.count("|") for row in rows}) == 1 and [r.split("|")[1].strip() for r in rows[2:]] == ["book", "ours"]
    data = json.loads((out / "ch05_run.json").read_text())
    book, ours = data["best"]["book"], data["best"]["ours"]
    assert data["quick"] is True and data["repeats"] == 1 and len(data["rounds"]["book"]) == 1
    for side in (book, ours):
        assert side["wall_s"] > 0 and side["peak_rss_mib"] > 0 and side["threads"] == 1 and side["epochs"] == 1
        assert "model.pth" in side["outputs"]
    assert "loss.pdf" in book["outputs"] and {"checkpoint.pth", "config.json", "loss.png"} <= set(ours["outputs"])
    # The same seed, data order and dropout draws: the same evaluations, the same losses.
    assert len(book["train_losses"]) == len(ours["train_losses"]) > 1
    assert book["train_losses"] == pytest.approx(ours["train_losses"], abs=1e-4)
    assert book["val_losses"] == pytest.approx(ours["val_losses"], abs=1e-4)
    assert f"{book['final_val_loss']:.3f}" == f"{ours['final_val_loss']:.3f}"
    assert any("final train loss" in line for line in ours["log_tail"])
    same = [g for g in data["goals"] if g["goal"].startswith("the same final losses")]
    assert len(data["goals"]) == 3 and same[0]["met"] is True
    assert data["speedup"] == pytest.approx(book["wall_s"] / ours["wall_s"])


def side(name: str, wall: float, rss: float, train: float, val: float) -> dict:
    return {"side": name, "threads": 2, "epochs": 10, "wall_s": wall, "peak_rss_mib": rss,
            "final_train_loss": train, "final_val_loss": val}


@pytest.mark.parametrize("ours, met", [
    (side("ours", 50.0, 900.0, 0.3581, 6.5419), [True, True, True]),
    (side("ours", 80.0, 900.0, 0.3581, 6.5419), [False, True, True]),
    (side("ours", 50.0, 1100.0, 0.3581, 6.5449), [True, False, False]),
])
def test_goals_follow_the_figures(ours, met):
    book = side("book", 100.0, 1000.0, 0.3579, 6.5421)
    table, goals = bench.summarize({"book": book, "ours": ours}, {"cpu": "x", "cores": 2, "torch": "t"},
                                   quick=False, repeats=1, book_model="book")
    assert [ok for _, ok in goals] == met
    assert f"book / ours time: {100.0 / ours['wall_s']:.2f}x" in table


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "argument --repeats"), (["--threads", "-1"], "argument --threads"),
    (["--epochs", "0"], "argument --epochs"), (["--book-model", "fast"], "argument --book-model"),
    (["--out", ""], "argument --out"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_an_unwritable_out_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_worker", lambda spec: pytest.fail("measured before --out was checked"))
    (tmp_path / "file").write_text("not a folder")
    assert bench.main(["--quick", "--out", str(tmp_path / "file" / "results")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: --out ") and "cannot be written" in err[-1]


def test_the_onednn_side_adds_our_opt_in_and_its_goals():
    assert bench.ours_argv({"side": bench.ONEDNN_SIDE, "quick": False, "out_dir": "o"})[-1] == "--onednn"
    assert "--onednn" not in bench.ours_argv({"side": "ours", "quick": False, "out_dir": "o"})
    best = {"book": side("book", 150.0, 1000.0, 0.3579, 6.5421), "ours": side("ours", 110.0, 900.0, 0.3581, 6.5419),
            bench.ONEDNN_SIDE: side(bench.ONEDNN_SIDE, 95.0, 950.0, 0.3581, 6.5419)}
    table, goals = bench.summarize(best, {"cpu": "x", "cores": 2, "torch": "t"}, quick=False, repeats=1,
                                   book_model="book")
    assert "| ours-onednn | 95.0 |" in table and "book / ours --onednn time: 1.58x" in table
    assert [ok for _, ok in goals] == [False, True, True, True, True]
    assert goals[3][0] == "ours --onednn >= 1.5x faster than the book's script (1.58x)"


def test_onednn_is_refused_where_it_cannot_run(monkeypatch, capsys):
    import llmfs.onednn_linear as ol

    monkeypatch.setattr(ol, "onednn_linear_supported", lambda: False)
    monkeypatch.setattr(bench, "run_worker", lambda spec: pytest.fail("measured"))
    assert bench.main(["--quick", "--onednn"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --onednn needs an x86 CPU")
