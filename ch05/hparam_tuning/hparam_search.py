"""Chapter 5 bonus: a hyperparameter search for pretraining, with Optuna instead of the book's grid.

The book's ch05/05_bonus_hparam_tuning/hparam_search.py trains the chapter-5 model once for every
combination in `HPARAM_GRID` (12,960 of them) and keeps the lowest final validation loss. Here a
seeded TPE sampler proposes settings under the same keys (`SEARCH_SPACE`), every trial reports its
validation loss at each evaluation so that a median pruner stops a trial whose curve is worse than
the median of the finished trials at the same step, and the study lives in an SQLite file, so an
interrupted search continues where it stopped:

    python -m ch05.hparam_tuning.hparam_search --quick --study-db outputs/ch05/hparam.db --trials 8

A trial is chapter 5's run (`ch05.cli.pretrain`: the book's loaders, loss and evaluation from
`ch05.gpt_train` inside `llmfs.trainer.train`), without its files and text samples. So the command
printed at the end, `python -m ch05.gpt_train ...` with the best settings (`--drop-rate` and
`--warmup-steps` included), gives the best trial's losses again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sqlite3
from pathlib import Path
from typing import Callable

import optuna
import torch

from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import GPT_CONFIG_124M, QUICK_CONFIG, GPTModel
from ch05.cli import check_text_fits, gpt_train
from llmfs.atomic import atomic_write
from llmfs.cli import Parser, add_quick_argument, device_name, path_argument, positive_int, run
from llmfs.download import get_data_file
from llmfs.errors import InvalidInput
from llmfs.runtime import get_device, set_seed
from llmfs.trainer import TrainingDiverged, TrainingInterrupted, make_optimizer, train

# Define a grid of hyperparameters to search over (the book's; 4*3*3*3*4*2*3*5 = 12,960 combinations)
HPARAM_GRID = {
    "batch_size": [2, 4, 8, 16],
    "drop_rate": [0.0, 0.1, 0.2],
    "warmup_iters": [10, 20, 30],
    "weight_decay": [0.1, 0.01, 0.0],
    "peak_lr": [0.0001, 0.0005, 0.001, 0.005],
    "initial_lr": [0.00005, 0.0001],
    "min_lr": [0.00005, 0.00001, 0.0001],
    "n_epochs": [5, 10, 15, 20, 25],
}

# New: what Optuna samples from, under the book's keys: a range where the grid had a list.
# Each entry: ("categorical", choices), ("int", low, high), ("float", low, high) or ("log", low, high)
# (a float drawn on a log scale). initial_lr and min_lr are left out: chapter 5's run has no cosine
# decay (its rate is constant), so ch05.gpt_train could not reproduce them.
SEARCH_SPACE = {
    "batch_size": ("categorical", [2, 4, 8, 16]),
    "drop_rate": ("float", 0.0, 0.2),
    "warmup_iters": ("int", 0, 30),
    "weight_decay": ("float", 0.0, 0.1),
    "peak_lr": ("log", 1e-4, 5e-3),
    "n_epochs": ("int", 5, 25),
}
# Quick mode: the tiny model (`QUICK_CONFIG`), at most `QUICK_MAX_STEPS` steps a trial.
QUICK_SEARCH_SPACE = {
    "batch_size": ("categorical", [2, 4]),
    "drop_rate": ("float", 0.0, 0.2),
    "warmup_iters": ("int", 0, 4),
    "weight_decay": ("float", 0.0, 0.1),
    "peak_lr": ("log", 1e-4, 1e-2),
    "n_epochs": ("categorical", [1]),
}
QUICK_MAX_STEPS = 12
STUDY_NAME = "hparam_search"


# --- One trial: chapter 5's run with the suggested settings ---------------------------------------

def suggest(trial: optuna.Trial, space: dict) -> dict:
    """The trial's settings, one `trial.suggest_*` per key of `space` (the sampler picks the values)."""
    params = {}
    for name, (kind, *spec) in space.items():
        if kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec[0]))
        elif kind == "int":
            params[name] = trial.suggest_int(name, spec[0], spec[1])
        elif kind in ("float", "log"):
            params[name] = trial.suggest_float(name, spec[0], spec[1], log=kind == "log")
        else:
            raise ValueError(f"unknown kind {kind!r} for {name!r} in the search space")
    return params


def train_with(params: dict, cfg: dict, settings: dict, text: str, device: torch.device | str = "cpu",
               max_steps: int | None = None, on_eval: Callable[[int, float], None] | None = None,
               verbose: bool = False) -> dict:
    """Pretrain as `ch05.cli.pretrain` does (same seed, loaders, initial weights, optimizer and loop),
    with the book's keys in `params`; `on_eval(step, val_loss)` sees every evaluation. Returns
    `llmfs.trainer.train`'s history (train_losses, val_losses, tokens_seen, global_step). The
    trainer's line per evaluation is shown only with `verbose` (a search prints one line a trial)."""
    cfg = {**cfg, "drop_rate": params["drop_rate"]}
    settings = {**settings, "learning_rate": params["peak_lr"], "weight_decay": params["weight_decay"],
                "batch_size": params["batch_size"], "num_epochs": params["n_epochs"]}
    device = get_device(device)
    set_seed(settings["seed"])
    listings = gpt_train()
    train_loader, val_loader = listings.create_train_val_loaders(text, cfg, settings["batch_size"],
                                                                 settings["train_ratio"])
    model = GPTModel(cfg).to(device)
    optimizer = make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    peak_lr, warmup_iters = params["peak_lr"], params.get("warmup_iters", 0)
    steps_done = 0

    def loss_fn(m, inputs, targets):
        nonlocal steps_done
        # New: a linear warm-up to peak_lr over warmup_iters steps (the book's appendix D), then
        # chapter 5's constant rate. Set here, once per step, before the optimizer's step uses it.
        lr = peak_lr * min(1.0, (steps_done + 1) / (warmup_iters + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        steps_done += 1
        return listings.calc_loss_batch(inputs, targets, m, device)

    def evaluate(m):
        train_loss, val_loss = listings.evaluate_model(m, train_loader, val_loader, device, settings["eval_iter"])
        if on_eval is not None:
            on_eval(steps_done - 1, val_loss)  # the trainer's global step of this evaluation
        return train_loss, val_loss

    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        return train(model, train_loader, val_loader, optimizer, device, num_epochs=settings["num_epochs"],
                     eval_freq=settings["eval_freq"], eval_iter=settings["eval_iter"], loss_fn=loss_fn,
                     evaluate_fn=evaluate, max_steps=max_steps, progress=False)


def objective(trial: optuna.Trial, search: dict, text: str, device: torch.device | str = "cpu") -> float:
    """Train with the trial's settings; report each validation loss so the pruner can stop the trial.

    Returns the last validation loss, the "final val loss" that ch05.gpt_train prints.
    """
    params = suggest(trial, search["space"])

    def report(step: int, val_loss: float) -> None:
        trial.report(val_loss, step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", step)
            raise optuna.TrialPruned(f"validation loss {val_loss:.3f} at step {step} is worse than the median")

    try:
        history = train_with(params, search["config"], search["settings"], text, device,
                             max_steps=search["max_steps"], on_eval=report)
    except TrainingDiverged as exc:  # a learning rate far too high: no usable curve, stop this trial
        trial.set_user_attr("diverged", str(exc).splitlines()[0])
        raise optuna.TrialPruned("the loss diverged") from None
    if not history["val_losses"]:
        raise InvalidInput(f"a trial made {history['global_step'] + 1} steps and no evaluation: lower --eval-freq "
                           f"(now {search['settings']['eval_freq']}) or train longer")
    return history["val_losses"][-1]


# --- The study: an SQLite file that the search resumes from ---------------------------------------

def search_settings(quick: bool, trials_seed: int = 123, context_length: int | None = None,
                    eval_freq: int | None = None, eval_iter: int | None = None, max_steps: int | None = None,
                    space: dict | None = None) -> dict:
    """Everything a study's trials share; stored in the study, so a rerun with other values is refused."""
    listings = gpt_train()
    cfg = dict(QUICK_CONFIG if quick else {**GPT_CONFIG_124M, "context_length": 256})  # as ch05.gpt_train
    settings = dict(listings.QUICK_SETTINGS if quick else listings.DEFAULT_SETTINGS)
    settings.pop("start_context")  # trials print no samples
    if quick:
        settings["eval_freq"] = 3  # New: several points per curve in a short trial, for the pruner
    if context_length is not None:
        cfg["context_length"] = context_length
    settings.update({k: v for k, v in (("eval_freq", eval_freq), ("eval_iter", eval_iter)) if v is not None})
    settings["seed"] = trials_seed
    if max_steps is None and quick:
        max_steps = QUICK_MAX_STEPS
    space = space if space is not None else (QUICK_SEARCH_SPACE if quick else SEARCH_SPACE)
    # JSON round trip: tuples become lists, as they come back from the study file.
    return json.loads(json.dumps({"quick": quick, "config": cfg, "settings": settings, "max_steps": max_steps,
                                  "space": space,
                                  # Prune from the second evaluation on, once 3 trials have finished.
                                  "pruner": {"n_startup_trials": 3, "n_warmup_steps": settings["eval_freq"]}}))


def check_study_db(path: str | Path) -> Path:
    """Refuse, before any work, a study file that is not an SQLite database or whose folder is missing."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"--study-db {path} is a folder: give a file name such as {path / 'study.db'}")
    if not path.parent.is_dir():
        raise InvalidInput(f"--study-db {path}: the folder {path.parent} does not exist")
    if path.exists() and path.stat().st_size:
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
                tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise InvalidInput(f"--study-db {path} is not an SQLite database ({exc})") from None
        if tables and "studies" not in tables:
            raise InvalidInput(f"--study-db {path} is an SQLite database but not an Optuna study: use another file")
    return path


def open_study(study_db: str | Path, search: dict, seed: int = 123) -> optuna.Study:
    """Create the study in `study_db`, or load it to continue; refuse one run with other settings."""
    path = check_study_db(study_db)
    storage = f"sqlite:///{path}"
    pruner = optuna.pruners.MedianPruner(**search["pruner"])
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage)] if path.exists() else []
    if STUDY_NAME in existing:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, pruner=pruner)
        stored = study.user_attrs.get("search")
        if stored != search or study.user_attrs.get("sampler_seed") != seed:
            stored = stored or {}
            differ = []
            for key in search:  # name what differs, down to the key of a settings dict
                old, new = stored.get(key), search[key]
                if isinstance(old, dict) and isinstance(new, dict):
                    differ += [f"{key}.{k}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
                elif old != new:
                    differ.append(key)
            if study.user_attrs.get("sampler_seed") != seed:
                differ.append("seed")
            named = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
            raise InvalidInput(f"--study-db {path} holds a study with other settings ({named} differ): "
                               "rerun it with the same options, or give another --study-db")
        # New: a seeded sampler restarted on a resumed study would propose its first points again;
        # offsetting its seed by the trials already there makes a resumed search draw new ones.
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
        # A trial still "running" was cut off (the process was killed): mark it failed, not finished.
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        # An interrupted trial runs again first, with its settings (once: a rerun names the trial it repeats).
        rerun = {t.user_attrs.get("rerun_of") for t in study.trials}
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            if t.number not in rerun and t.params:
                study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
        return study
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    study.set_user_attr("search", search)
    study.set_user_attr("sampler_seed", seed)
    return study


def finished_trials(study: optuna.Study) -> list:
    """Trials that count towards --trials: completed or pruned (an interrupted trial runs again)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def run_search(study: optuna.Study, n_trials: int, text: str, device: torch.device | str = "cpu",
               verbose: bool = True) -> optuna.Study:
    """Run trials until `n_trials` have finished (completed or pruned), counting those already in the study."""
    search = study.user_attrs["search"]
    todo = n_trials - len(finished_trials(study))

    def line(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if verbose:
            print(trial_line(t), flush=True)

    if todo > 0:
        study.optimize(lambda trial: objective(trial, search, text, device), n_trials=todo, callbacks=[line])
    return study


# --- Reporting: the trials table and the best command ----------------------------------------------

def trial_line(t: optuna.trial.FrozenTrial) -> str:
    state = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "interrupted"}.get(t.state.name, t.state.name.lower())
    curve = t.intermediate_values
    last = f"{t.value:.3f}" if t.value is not None else (f"{curve[max(curve)]:.3f}" if curve else "-")
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
    return f"trial {t.number:3d} {state:<11} val loss {last:>6} after {len(curve)} evaluations  {params}"


def trials_table(study: optuna.Study) -> str:
    """One row per trial: state, last validation loss, evaluations and the settings (a markdown table)."""
    keys = list(study.user_attrs["search"]["space"])
    rows = ["| trial | state | val loss | evaluations | " + " | ".join(keys) + " |",
            "|---|---|---|---|" + "---|" * len(keys)]
    for t in study.trials:
        state = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "interrupted"}.get(t.state.name, t.state.name.lower())
        curve = t.intermediate_values
        value = t.value if t.value is not None else (curve[max(curve)] if curve else None)
        cells = [f"{t.params[k]:.3g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "-"))
                 for k in keys]
        rows.append(f"| {t.number} | {state} | {'-' if value is None else f'{value:.3f}'} | {len(curve)} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def best_command(study: optuna.Study, output_dir: str | Path = "outputs/ch05/hparam-best",
                 device: str | None = None) -> tuple[list[str], str]:
    """The `python -m ch05.gpt_train ...` argv that trains with the best trial's settings, and a note.

    Every key maps to an option: peak_lr -> --lr, weight_decay, batch_size, n_epochs -> --epochs,
    drop_rate -> --drop-rate and warmup_iters -> --warmup-steps (the same linear warm-up as the
    trials'), with the search's context length, evaluation settings, seed and step limit.
    """
    search, best = study.user_attrs["search"], study.best_trial
    p = best.params
    argv = ["python", "-m", "ch05.gpt_train"] + (["--quick"] if search["quick"] else [])
    base_context = QUICK_CONFIG["context_length"] if search["quick"] else 256
    if search["config"]["context_length"] != base_context:
        argv += ["--context-length", str(search["config"]["context_length"])]
    # repr() of a float reads back as the same float: the command trains with exactly the trial's values.
    argv += ["--lr", repr(p["peak_lr"]), "--weight-decay", repr(p["weight_decay"]),
             "--batch-size", str(p["batch_size"]), "--epochs", str(p["n_epochs"]), "--eval-freq", str(search["settings"]["eval_freq"]),
             "--eval-iter", str(search["settings"]["eval_iter"]), "--seed", str(search["settings"]["seed"])]
    if search["max_steps"] is not None:
        argv += ["--max-steps", str(search["max_steps"])]
    if device is not None:
        argv += ["--device", device]
    argv += ["--drop-rate", repr(p["drop_rate"])]
    if p.get("warmup_iters"):
        argv += ["--warmup-steps", str(p["warmup_iters"])]
    argv += ["--output-dir", str(output_dir)]
    note = f"trial {best.number}: final val loss {best.value:.4f}; this command gives it again"
    return argv, note


def write_best(study: optuna.Study, path: str | Path, output_dir: str | Path, device: str | None = None) -> str:
    """Print and write (atomically) the best settings and their command line; returns the command."""
    argv, note = best_command(study, output_dir, device)
    command = shlex.join(argv)
    best = study.best_trial
    text = (f"# best settings: {json.dumps(best.params)}\n# {note}\n{command}\n")
    with atomic_write(path) as f:
        f.write(text)
    return command


# --- python -m ch05.hparam_tuning.hparam_search --------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ch05.hparam_tuning.hparam_search",
               description="Search chapter 5's pretraining settings with Optuna (TPE sampler, median pruning); "
                           "the study is an SQLite file, so a rerun continues an interrupted search.")
    add_quick_argument(p, f"the tiny model, at most {QUICK_MAX_STEPS} steps a trial (about a minute on a CPU)")
    p.add_argument("--study-db", type=path_argument, required=True,
                   help="the study's SQLite file (created, or continued when it exists)")
    p.add_argument("--trials", type=positive_int, default=None,
                   help="finished trials to reach, counting those in the study (default 8; full: 50)")
    p.add_argument("--seed", type=int, default=123, help="seed of the sampler and of every trial (default 123)")
    p.add_argument("--context-length", type=positive_int, help="context length (default 256; quick: 64)")
    p.add_argument("--eval-freq", type=positive_int, help="evaluate every N steps (default 5; quick: 3)")
    p.add_argument("--eval-iter", type=positive_int, help="batches per evaluation (default 5; quick: 2)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help=f"stop each trial after N steps (quick: {QUICK_MAX_STEPS}; default: its epochs)")
    p.add_argument("--best-command", type=path_argument, default=None,
                   help="where the best command line goes (default: the study file with .best.sh)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: best available)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ch05.hparam_tuning.hparam_search ...`; returns the exit code."""
    args = parser().parse_args(argv)

    def work() -> None:
        if args.context_length and args.context_length > GPT_CONFIG_124M["context_length"]:
            raise InvalidInput(f"--context-length {args.context_length} is longer than GPT-2's 1024 positions")
        search = search_settings(args.quick, args.seed, args.context_length, args.eval_freq, args.eval_iter,
                                 args.max_steps)
        n_trials = args.trials or (8 if args.quick else 50)
        best_path = args.best_command or Path(f"{Path(args.study_db).with_suffix('')}.best.sh")
        if not Path(best_path).parent.is_dir():
            raise InvalidInput(f"--best-command {best_path}: the folder {Path(best_path).parent} does not exist")
        check_study_db(args.study_db)
        text = get_data_file("the-verdict.txt").read_text(encoding="utf-8")
        space = search["space"]
        largest_batch = max(space["batch_size"][1]) if space["batch_size"][0] == "categorical" else \
            space["batch_size"][2]
        check_text_fits(text, get_gpt2_tokenizer(), search["config"]["context_length"], largest_batch,
                        search["settings"]["train_ratio"])
        # One line per trial, ours (Optuna would also log an interrupted trial's traceback as a warning).
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = open_study(args.study_db, search, args.seed)
        before = len(finished_trials(study))
        print(f"study {args.study_db}: {before} finished trials, {max(n_trials - before, 0)} to run"
              f"{' (quick mode: the tiny model)' if args.quick else ''}", flush=True)
        try:
            run_search(study, n_trials, text, args.device)
        except (KeyboardInterrupt, TrainingInterrupted):
            done = len(finished_trials(study))
            raise KeyboardInterrupt(f"{done} finished trials are kept in {args.study_db}; run the same command "
                                    f"again to continue to {n_trials}") from None
        print()
        print(trials_table(study))
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
        print(f"\n{len(finished_trials(study))} trials ({pruned} pruned); best: trial {study.best_trial.number}, "
              f"val loss {study.best_value:.4f}, {json.dumps(study.best_trial.params)}")
        out_dir = Path(args.study_db).parent / f"{Path(args.study_db).stem}-best"
        command = write_best(study, best_path, out_dir, args.device)
        print(f"{best_command(study, out_dir, args.device)[1]}\n{command}\n(written to {best_path})")

    return run(work, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
