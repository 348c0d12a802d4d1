"""The chapter-5 main job, side by side: the book's script (`gpt_train.py` main) and our command.

    python -m benchmarks.ch05_run            # the book's settings (124M, context 256, 10 epochs): ~12 minutes idle
    python -m benchmarks.ch05_run --quick    # the chapter's quick config: a smoke test of the harness (a minute)

"book": the book repository's ch05/01_main-chapter-code/gpt_train.py `main()` as the book writes it, built
from our listing modules (which the notebooks build): `torch.manual_seed(123)`, the model on the book's own
classes (chapter 3's explicit masked-softmax attention, the book's LayerNorm/GELU, the untied head, as
`ch05.training_speed` builds its "book" rung; `--book-model listing`: `ch04.gpt.GPTModel(cfg)`, the same
model with our fused attention and LayerNorm/GELU calls), `torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)`,
chapter 2's `create_dataloader_v1` (batch 2, stride = context), `train_model_simple` (eval_freq 5,
eval_iter 1, "Every effort moves you"), the loss plot (loss.pdf) and `torch.save(model.state_dict())`.

"ours": `python -m ch05.gpt_train --lr 5e-4 --eval-iter 1` (the same seed, data, batch, epochs and
evaluation; the trainer of `llmfs.trainer`, fused AdamW, KV-cached samples, checkpoint.pth and model.pth).
"ours-onednn" (with `--onednn`): the same command with its opt-in `--onednn` (oneDNN linear layers, x86:
faster on the AMD EPYC measured, slower on an Intel Xeon).

Each side runs in a fresh process (`--repeats` rounds, the fastest kept), with the same torch thread count,
on the CPU, its outputs in a temporary folder. Recorded per side: wall time (from the measuring process's
start, imports included, to the end of the run), peak RSS (the process's own VmHWM), the final train and
validation loss. Goal: ours >= 1.5x faster, the same final losses (3 decimals), a lower peak RSS.

Writes ch05_run.md and ch05_run.json into --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmfs.bench import machine_description, proc_status_mib, write_report
from llmfs.cli import Parser, add_quick_argument, check_output_dir, path_argument, positive_int, run
from llmfs.onednn_linear import check_onednn

SIDES = ("book", "ours")
ONEDNN_SIDE = "ours-onednn"  # --onednn: our command once more with its opt-in --onednn (x86; faster on AMD EPYC)
BOOK_MODELS = ("listing", "book")
# The book's gpt_train.py: OTHER_HPARAMS and the train_model_simple call.
BOOK_HPARAMS = {"learning_rate": 5e-4, "num_epochs": 10, "batch_size": 2, "weight_decay": 0.1,
                "eval_freq": 5, "eval_iter": 1, "start_context": "Every effort moves you", "train_ratio": 0.9,
                "seed": 123}
SPEEDUP_GOAL = 1.5


def settings_for(quick: bool, epochs: int | None = None) -> tuple[dict, dict]:
    """The model config and hyperparameters both sides run: the book's, or the chapter's quick config
    with the quick run's epochs (everything else the book's); `epochs` overrides the epochs."""
    from ch04.gpt import GPT_CONFIG_124M, QUICK_CONFIG
    from ch05.gpt_train import QUICK_SETTINGS

    if quick:
        cfg, hparams = dict(QUICK_CONFIG), {**BOOK_HPARAMS, "num_epochs": QUICK_SETTINGS["num_epochs"]}
    else:
        cfg, hparams = {**GPT_CONFIG_124M, "context_length": 256}, dict(BOOK_HPARAMS)
    if epochs is not None:
        hparams["num_epochs"] = epochs
    return cfg, hparams


def ours_argv(spec: dict) -> list[str]:
    """`python -m ch05.gpt_train ...` with the book's settings (the seed, batch size, weight decay and
    eval frequency are already the command's defaults)."""
    argv = ["--lr", str(BOOK_HPARAMS["learning_rate"]), "--eval-iter", str(BOOK_HPARAMS["eval_iter"]),
            "--output-dir", spec["out_dir"], "--device", "cpu", "--no-progress"]
    if spec.get("epochs") is not None:
        argv += ["--epochs", str(spec["epochs"])]
    if spec.get("side") == ONEDNN_SIDE:
        argv.append("--onednn")
    return (["--quick"] if spec["quick"] else []) + argv


def book_main(cfg: dict, hparams: dict, out_dir: Path, book_model: str = "book") -> tuple[list, list, list]:
    """The book's gpt_train.py `main()` and its `__main__` tail (plot, torch.save), from our listings."""
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from ch02.dataloader import create_dataloader_v1
    from ch02.tokenizer import get_gpt2_tokenizer
    from ch04.gpt import GPTModel
    from ch05.gpt_train import plot_losses, train_model_simple
    from ch05.training_speed.training_speed import build_model
    from llmfs.download import get_data_file

    torch.manual_seed(hparams["seed"])
    device = torch.device("cpu")
    text_data = get_data_file("the-verdict.txt").read_text(encoding="utf-8")

    model = build_model(cfg) if book_model == "book" else GPTModel(cfg)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hparams["learning_rate"],
                                  weight_decay=hparams["weight_decay"])

    split_idx = int(hparams["train_ratio"] * len(text_data))
    train_loader = create_dataloader_v1(text_data[:split_idx], batch_size=hparams["batch_size"],
                                        max_length=cfg["context_length"], stride=cfg["context_length"],
                                        drop_last=True, shuffle=True)
    val_loader = create_dataloader_v1(text_data[split_idx:], batch_size=hparams["batch_size"],
                                      max_length=cfg["context_length"], stride=cfg["context_length"],
                                      drop_last=False, shuffle=False)

    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=hparams["num_epochs"],
        eval_freq=hparams["eval_freq"], eval_iter=hparams["eval_iter"], start_context=hparams["start_context"],
        tokenizer=get_gpt2_tokenizer())

    epochs_tensor = torch.linspace(0, hparams["num_epochs"], len(train_losses))
    plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses, out_dir / "loss.pdf")
    torch.save(model.state_dict(), out_dir / "model.pth")
    return train_losses, val_losses, tokens_seen


def worker(spec: dict) -> dict:
    """One side in this (fresh) process: run it, then read the clock and this process's peak RSS."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    cfg, hparams = settings_for(spec["quick"], spec.get("epochs"))
    out_dir = Path(spec["out_dir"])
    if spec["side"] == "book":
        train_losses, val_losses, _ = book_main(cfg, hparams, out_dir, spec["book_model"])
        code = 0
    else:
        import runpy

        sys.argv = ["python -m ch05.gpt_train", *ours_argv(spec)]
        try:
            runpy.run_module("ch05.gpt_train", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    wall = time.perf_counter() - start
    peak = proc_status_mib("VmHWM")
    if spec["side"] != "book":
        if code != 0:
            raise RuntimeError(f"python -m ch05.gpt_train exited with {code}")
        # Measured; now the exact losses the run recorded (its printed line has 3 decimals).
        state = torch.load(out_dir / "checkpoint.pth", map_location="cpu", weights_only=True, mmap=True)
        history = state.get("history", state)
        train_losses, val_losses = list(history["train_losses"]), list(history["val_losses"])
    return {"side": spec["side"], "threads": torch.get_num_threads(), "epochs": hparams["num_epochs"],
            "wall_s": wall, "peak_rss_mib": peak,
            "train_losses": [float(x) for x in train_losses], "val_losses": [float(x) for x in val_losses],
            "final_train_loss": float(train_losses[-1]), "final_val_loss": float(val_losses[-1]),
            "outputs": sorted(p.name for p in out_dir.iterdir())}


def run_worker(spec: dict, timeout: float = 3600) -> dict:
    """One side in a fresh process (its own peak RSS), `spec["threads"]` threads, its outputs in a temp folder."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "MPLBACKEND": "Agg", "LLMFS_QUICK": "0"}
    with tempfile.TemporaryDirectory(prefix=f"ch05_run_{spec['side']}_") as tmp:
        spec = {**spec, "out_dir": tmp}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.ch05_run", "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "log_tail": proc.stdout.splitlines()[-4:-1]}
    raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def same_losses(a: dict, b: dict) -> bool:
    """Whether two sides end at the same final train and validation losses, to 3 decimals (the goal)."""
    return all(f"{a[k]:.3f}" == f"{b[k]:.3f}" for k in ("final_train_loss", "final_val_loss"))


def summarize(best: dict, machine: dict, quick: bool, repeats: int, book_model: str,
              epochs_given: bool = False) -> tuple[str, list]:
    """The table (Markdown) and the goals: speed, the same final losses, a lower peak RSS."""
    book, ours = best["book"], best["ours"]
    epochs = book["epochs"]
    shape = ("the chapter's quick config: a smoke run" if quick
             else "GPT-2 124M shape, context 256: the book's settings")
    model = ("the book's plain model (explicit attention, the book's LayerNorm/GELU)" if book_model == "book"
             else "our ch04 GPTModel as the chapter-5 notebook builds it")
    lines = [f"# The chapter-5 run: the book's script and our command ({shape})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {book['threads']} "
             f"threads, CPU. Both sides: seed 123, the-verdict, {epochs} epoch(s), lr 5e-4, weight decay 0.1, "
             f"batch 2, eval_freq 5, eval_iter 1. book: the book's gpt_train.py main() from our listings, {model}; ours: "
             f"`python -m ch05.gpt_train{' --quick' if quick else ''} --lr 5e-4 --eval-iter 1"
             f"{f' --epochs {epochs}' if epochs_given else ''}`. Each side in a "
             f"fresh process, fastest of {repeats} round(s).", "",
             "| side | wall time (s) | peak RSS (MiB) | final train loss | final val loss |",
             "|---|---:|---:|---:|---:|"]
    for r in (book, ours, *([best[ONEDNN_SIDE]] if ONEDNN_SIDE in best else [])):
        lines.append(f"| {r['side']} | {r['wall_s']:,.1f} | {r['peak_rss_mib']:,.0f} | {r['final_train_loss']:.3f} | "
                     f"{r['final_val_loss']:.3f} |")
    speedup = book["wall_s"] / ours["wall_s"]
    rss_ratio = ours["peak_rss_mib"] / book["peak_rss_mib"]
    lines += ["", f"book / ours time: {speedup:.2f}x; ours / book peak RSS: {rss_ratio:.2f}x"]
    goals = [(f"ours >= {SPEEDUP_GOAL}x faster than the book's script ({speedup:.2f}x)", speedup >= SPEEDUP_GOAL),
             (f"the same final losses to 3 decimals (book {book['final_train_loss']:.3f} / "
              f"{book['final_val_loss']:.3f}, ours {ours['final_train_loss']:.3f} / {ours['final_val_loss']:.3f})",
              same_losses(book, ours)),
             (f"a lower peak RSS ({ours['peak_rss_mib']:,.0f} vs {book['peak_rss_mib']:,.0f} MiB)", rss_ratio < 1.0)]
    if ONEDNN_SIDE in best:  # the opt-in: its speed, and the losses it must keep
        fast = best[ONEDNN_SIDE]
        speedup = book["wall_s"] / fast["wall_s"]
        lines += [f"book / ours --onednn time: {speedup:.2f}x; ours --onednn / book peak RSS: "
                  f"{fast['peak_rss_mib'] / book['peak_rss_mib']:.2f}x"]
        goals += [(f"ours --onednn >= {SPEEDUP_GOAL}x faster than the book's script ({speedup:.2f}x)",
                   speedup >= SPEEDUP_GOAL),
                  (f"ours --onednn: the same final losses to 3 decimals ({fast['final_train_loss']:.3f} / "
                   f"{fast['final_val_loss']:.3f})",
                   same_losses(book, fast))]
    lines += [""] + [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in goals]
    return "\n".join(lines) + "\n", goals


def parser() -> Parser:
    p = Parser(prog="python -m benchmarks.ch05_run",
               description="The chapter-5 run, side by side: the book's gpt_train.py (from our listings) and "
                           "python -m ch05.gpt_train: wall time, peak RSS and final losses.")
    add_quick_argument(p, "the chapter's quick config: checks the harness, not the speed")
    p.add_argument("--repeats", type=positive_int, default=1, help="rounds of both sides; the fastest is kept "
                   "(default 1)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="torch threads for both sides (default: all cores)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs for both sides (default: the book's 10; quick: the quick run's 4)")
    p.add_argument("--book-model", choices=BOOK_MODELS, default="book",
                   help="the book side's model: book (default), the book's classes (explicit attention, its "
                        "LayerNorm/GELU); listing, ch04.gpt.GPTModel with our fused calls")
    p.add_argument("--onednn", action="store_true",
                   help="also run our command with its opt-in --onednn (x86 CPUs: oneDNN linear layers; faster on "
                        "the AMD EPYC measured, slower on Intel Xeon)")
    p.add_argument("--out", type=path_argument, default=Path(__file__).resolve().parent / "results",
                   help="folder for ch05_run.md and .json (default benchmarks/results)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.ch05_run [options]`; returns the exit code."""
    args = parser().parse_args(argv)
    if args.worker is not None:
        result = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    def benchmark() -> None:
        check_output_dir(args.out, option="--out")  # before minutes of measuring
        from llmfs.download import get_data_file

        get_data_file("the-verdict.txt")  # offline: one line saying where to put it, before any run
        check_onednn(args.onednn)
        machine = {**machine_description(), "threads": args.threads}
        sides = (*SIDES, ONEDNN_SIDE) if args.onednn else SIDES
        rounds: dict[str, list[dict]] = {side: [] for side in sides}
        for i in range(args.repeats):
            for side in sides:
                print(f"round {i + 1}/{args.repeats}: {side} ...", flush=True)
                spec = {"side": side, "quick": args.quick, "threads": args.threads, "book_model": args.book_model,
                        "epochs": args.epochs}
                rounds[side].append(run_worker(spec))
        best = {side: min(rows, key=lambda r: r["wall_s"]) for side, rows in rounds.items()}
        table, goals = summarize(best, machine, args.quick, args.repeats, args.book_model, args.epochs is not None)
        write_report(args.out, "ch05_run.json", "ch05_run.md",
                     {"machine": machine, "quick": args.quick, "repeats": args.repeats, "book_model": args.book_model,
                      "best": best, "rounds": rounds,
                      "speedup": best["book"]["wall_s"] / best["ours"]["wall_s"],
                      "rss_ratio": best["ours"]["peak_rss_mib"] / best["book"]["peak_rss_mib"],
                      "goals": [{"goal": text, "met": ok} for text, ok in goals]}, table, goals)

    return run(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
