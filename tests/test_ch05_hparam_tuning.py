"""ch05/hparam_tuning/hparam_search.py: the Optuna search over chapter 5's pretraining.

Tiny studies on the-verdict with the quick model at context length 16 and 2-3 steps a trial (a
fraction of a second each): trials run and are recorded in SQLite, a planted bad trial is pruned
from its validation curve, an interrupted search resumes to exactly N trials with the earlier ones
unchanged, the seeded sampler repeats its suggestions, the printed ch05.gpt_train command gives
the best trial's validation loss again, and a study of other settings is refused with one line.
"""

from __future__ import annotations

import json
import math
import warnings

import optuna
import pytest

from ch05.cli import pretrain, train_parser, train_settings
from ch05.hparam_tuning import hparam_search as hs
from nbexec import REPO

TINY = ["--quick", "--context-length", "16", "--eval-freq", "1", "--eval-iter", "1", "--max-steps", "2",
        "--device", "cpu"]
# One value for every key but the learning rate and weight decay; no warm-up and chapter 5's dropout,
# so the command reproduces the best trial.
TINY_SPACE = {"batch_size": ("categorical", [2]), "drop_rate": ("categorical", [0.1]),
              "warmup_iters": ("categorical", [0]), "weight_decay": ("float", 0.0, 0.1),
              "peak_lr": ("log", 1e-4, 3e-3), "n_epochs": ("categorical", [1])}


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_search(max_steps: int = 3, space: dict | None = None, **pruner) -> dict:
    search = hs.search_settings(True, 123, context_length=16, eval_freq=1, eval_iter=1, max_steps=max_steps,
                                space=space or TINY_SPACE)
    search["pruner"].update(pruner)
    return search


def summary(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state.name, t.params, t.value, dict(t.intermediate_values)) for t in study.trials]


def test_a_tiny_study_runs_and_prunes_a_planted_bad_trial(tmp_path, verdict_text):
    study = hs.open_study(tmp_path / "s.db", tiny_search(n_startup_trials=2, n_warmup_steps=1))
    hs.run_search(study, 2, verdict_text, "cpu", verbose=False)
    bad = {"batch_size": 2, "drop_rate": 0.1, "warmup_iters": 0, "weight_decay": 0.0, "n_epochs": 1,
           "peak_lr": 0.5}  # far outside the space: the loss climbs instead of falling
    study.enqueue_trial(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fixed parameter peak_lr ... is out of range"
        hs.run_search(study, 3, verdict_text, "cpu", verbose=False)
    first, second, planted = study.trials
    assert first.state == second.state == optuna.trial.TrialState.COMPLETE
    assert len(first.intermediate_values) == 3  # one report per evaluation: steps 0, 1, 2
    assert planted.params["peak_lr"] == 0.5
    assert planted.state == optuna.trial.TrialState.PRUNED
    # Pruned by the median rule at the first step it may prune (not by divergence), before the last step.
    assert planted.user_attrs["pruned_at_step"] == 1 and "diverged" not in planted.user_attrs
    assert sorted(planted.intermediate_values) == [0, 1]
    median = sorted(t.intermediate_values[1] for t in (first, second))
    assert planted.intermediate_values[1] > sum(median) / 2
    # The table has a row per trial, with its state.
    table = hs.trials_table(study).splitlines()
    assert len(table) == 2 + 3 and "| 2 | pruned |" in table[-1]
    # The trials are in the SQLite file: another Study object reads the same ones.
    again = optuna.load_study(study_name=hs.STUDY_NAME, storage=f"sqlite:///{tmp_path / 's.db'}")
    assert summary(again) == summary(study)


def test_an_interrupted_search_resumes_to_exactly_n_trials(tmp_path, monkeypatch, capsys):
    db = tmp_path / "s.db"
    assert hs.main([*TINY, "--study-db", str(db), "--trials", "2"]) == 0
    first_two = summary(optuna.load_study(study_name=hs.STUDY_NAME, storage=f"sqlite:///{db}"))
    assert len(first_two) == 2
    capsys.readouterr()

    # "Ctrl-C" during the next trial's training: the finished trials stay, the command says how to go on.
    real = hs.train_with

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hs, "train_with", interrupted)
    assert hs.main([*TINY, "--study-db", str(db), "--trials", "4"]) == 130
    err = capsys.readouterr().err
    assert "2 finished trials are kept" in err and "continue to 4" in err
    monkeypatch.setattr(hs, "train_with", real)

    assert hs.main([*TINY, "--study-db", str(db), "--trials", "4"]) == 0
    study = optuna.load_study(study_name=hs.STUDY_NAME, storage=f"sqlite:///{db}")
    finished = hs.finished_trials(study)
    assert len(finished) == 4
    assert summary(study)[:2] == first_two  # unchanged
    assert [t.state.name for t in study.trials].count("FAIL") == 1  # the interrupted one, kept as such
    # The interrupted trial ran again first, with its settings; then the resumed sampler drew new settings,
    # not the first trials' again.
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert finished[2].params == failed.params and finished[2].user_attrs["rerun_of"] == failed.number
    assert all(t.params != u.params for t in finished[2:] for u in finished[:2])
    assert finished[3].params != failed.params
    # Asking for no more trials than are finished runs none.
    assert hs.main([*TINY, "--study-db", str(db), "--trials", "3"]) == 0
    assert len(optuna.load_study(study_name=hs.STUDY_NAME, storage=f"sqlite:///{db}").trials) == 5


def first_suggestions(path, seed: int, n: int = 4) -> list[dict]:
    study = hs.open_study(path, tiny_search(), seed=seed)
    found = []
    for i in range(n):  # ask/tell without training: only the sampler's choices matter here
        trial = study.ask()
        found.append(hs.suggest(trial, TINY_SPACE))
        study.tell(trial, float(i))
    return found


def test_the_seeded_sampler_repeats_its_first_suggestions(tmp_path):
    a = first_suggestions(tmp_path / "a.db", 123)
    assert a == first_suggestions(tmp_path / "b.db", 123)
    assert a != first_suggestions(tmp_path / "c.db", 7)
    assert len({p["peak_lr"] for p in a}) == len(a)  # four different draws
    assert all(1e-4 <= p["peak_lr"] <= 3e-3 and 0 <= p["weight_decay"] <= 0.1 for p in a)


# The second space has a warm-up and no dropout: ch05.gpt_train's --warmup-steps and --drop-rate.
@pytest.mark.parametrize("space", [TINY_SPACE, {**TINY_SPACE, "drop_rate": ("categorical", [0.0]),
                                                "warmup_iters": ("categorical", [2])}], ids=["plain", "warmup-nodrop"])
def test_the_best_command_gives_the_best_trials_validation_loss(tmp_path, verdict_text, capsys, space):
    study = hs.open_study(tmp_path / "s.db", tiny_search(space=space))
    hs.run_search(study, 3, verdict_text, "cpu", verbose=False)
    out_dir = tmp_path / "best"
    argv, note = hs.best_command(study, out_dir, "cpu")
    assert argv[:3] == ["python", "-m", "ch05.gpt_train"] and "gives it again" in note
    args = train_parser().parse_args(argv[3:])
    cfg, settings = train_settings(args)
    out = pretrain(cfg, settings, args.output_dir, device=args.device, max_steps=args.max_steps,
                   progress=False, keep_freed_memory=False, sample_tokens=0)
    best = study.best_trial
    assert out["val_losses"] == [best.intermediate_values[s] for s in sorted(best.intermediate_values)]
    assert out["val_losses"][-1] == study.best_value
    assert (out_dir / "model.pth").is_file()
    p = study.best_trial.params
    assert ("--warmup-steps" in argv) == bool(p["warmup_iters"]) and argv[argv.index("--drop-rate") + 1] == repr(p["drop_rate"])


def test_the_command_prints_the_table_and_writes_the_best_command(tmp_path, capsys):
    db = tmp_path / "s.db"
    assert hs.main([*TINY, "--study-db", str(db), "--trials", "3"]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name=hs.STUDY_NAME, storage=f"sqlite:///{db}")
    written = (tmp_path / "s.best.sh").read_text(encoding="utf-8").splitlines()
    command = written[-1]
    assert command.startswith("python -m ch05.gpt_train --quick --context-length 16 ") and command in out
    assert json.loads(written[0].removeprefix("# best settings: ")) == study.best_trial.params
    assert f"--lr {study.best_trial.params['peak_lr']!r} " in command
    assert sum(line.startswith("| ") for line in out.splitlines()) == 1 + 3  # the header and a row a trial


@pytest.mark.parametrize("change, message", [
    (["--eval-iter", "2"], "holds a study with other settings (settings.eval_iter differ)"),
    (["--seed", "7"], "holds a study with other settings (settings.seed, seed differ)"),
    (["--context-length", "32"], "holds a study with other settings (config.context_length differ)"),
])
def test_a_study_of_other_settings_is_refused_with_one_line(tmp_path, capsys, change, message):
    db = tmp_path / "s.db"
    assert hs.main([*TINY, "--study-db", str(db), "--trials", "1"]) == 0
    before = db.read_bytes()
    capsys.readouterr()
    argv = [*TINY, "--study-db", str(db), "--trials", "2", *change]
    assert hs.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert db.read_bytes() == before


def test_bad_inputs_get_one_line_before_any_work(tmp_path, capsys):
    not_db = tmp_path / "notes.txt"
    not_db.write_text("my notes\n" * 100, encoding="utf-8")
    cases = [(["--study-db", str(not_db)], "is not an SQLite database"),
             (["--study-db", str(tmp_path / "missing" / "s.db")], "does not exist"),
             (["--study-db", str(tmp_path)], "is a folder"),
             (["--study-db", str(tmp_path / "s.db"), "--context-length", "2000"], "longer than GPT-2's"),
             (["--study-db", str(tmp_path / "s.db"), "--context-length", "1000"], "too short")]
    for extra, message in cases:
        argv = [a for a in TINY if a not in ("--context-length", "16")] + extra
        assert hs.main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not_db.read_text(encoding="utf-8") == "my notes\n" * 100
    assert not (tmp_path / "s.db").exists()
    with pytest.raises(SystemExit):
        hs.main(["--quick"])  # --study-db is required
    assert "--study-db" in capsys.readouterr().err


def test_the_notebooks_stored_outputs_agree_with_the_module():
    """The stored quick-mode run: the grid's size, a table row per trial, a best command ch05.gpt_train parses
    whose settings lie in the quick search space."""
    cells = json.loads((REPO / "ch05/hparam_tuning/hparam-search.ipynb").read_text(encoding="utf-8"))["cells"]
    text = "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code"
                   for o in c.get("outputs", []))
    assert f"{math.prod(len(v) for v in hs.HPARAM_GRID.values()):,} combinations" in text
    commands = [line for line in text.splitlines() if line.startswith("python -m ch05.gpt_train ")]
    assert commands
    args = train_parser().parse_args(commands[-1].split()[3:])
    space = hs.QUICK_SEARCH_SPACE
    assert args.quick and args.batch_size in space["batch_size"][1]
    assert space["peak_lr"][1] <= args.lr <= space["peak_lr"][2]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| trial |" not in line]
    assert any("| pruned |" in row for row in rows) and any("| done |" in row for row in rows)
