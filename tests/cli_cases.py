"""Bad and unlucky invocations of every chapter command, and what each must do: exit 2 with one
line `error: ...` on stderr and no traceback, before any training or download.

    python tests/cli_cases.py          # runs every case as its own subprocess, prints a table
    python tests/cli_cases.py -k ch06  # only the cases whose id contains "ch06"

`tests/test_cli_cases.py` runs the same cases in-process (fast) and a sample as subprocesses.
Placeholders in the arguments ({empty}, {tiny_ckpt}, ...) are files made once by `make_fixtures`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAIN = "ch05.gpt_train"
GENERATE = "ch05.gpt_generate"
DOWNLOAD = "ch05.gpt_download"
CLASSIFY = "ch06.gpt_class_finetune"
INSTRUCT = "ch07.gpt_instruction_finetuning"
JUDGE = "ch07.ollama_evaluate"
DPO = "ch07.dpo"
PAIRS = "ch07.dpo.preference_data"

# The tiny model every case that needs one loads (seconds to build, a few hundred KB).
TINY_CFG = {"vocab_size": 50257, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
            "drop_rate": 0.0, "qkv_bias": False}

_BAD_FILES = ["empty", "text", "bad_st", "folder", "missing"]


def _file_cases(module: str, option: str, extra: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    return [(f"{module} {option} {kind}", [*extra, option, f"{{{kind}}}"]) for kind in _BAD_FILES]


CASES: list[tuple[str, str, list[str]]] = [
    # --- ch05.gpt_train: values checked by the parser
    *[(TRAIN, f"{TRAIN} {' '.join(a)}", ["--quick", *a]) for a in [
        ["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "two"], ["--epochs", "1.5"],
        ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"], ["--lr", "-1e-3"],
        ["--batch-size", "0"], ["--eval-freq", "0"], ["--eval-iter", "0"],
        ["--weight-decay", "-0.1"], ["--weight-decay", "nan"], ["--context-length", "0"],
        ["--context-length", "2048"], ["--max-steps", "0"], ["--checkpoint-every", "0"],
        ["--dtype", "float16"], ["--seed", "abc"], ["--no-such-option"], ["--output-dir", "{file_parent}"],
        ["--output-dir", "{finished5}"], ["--device", "tpu"], ["--device", ""], ["--output-dir", ""],
        ["--output-dir", "{interrupted}"], ["--onednn", "--dtype", "bfloat16"],
        ["--lr", "1e30", "--max-steps", "5", "--no-progress", "--output-dir", "{fresh}/diverged"],
    ]],
    *[(TRAIN, name, ["--quick", *args]) for name, args in _file_cases(TRAIN, "--resume")],
    (TRAIN, f"{TRAIN} --resume weights-only", ["--quick", "--resume", "{tiny_model}"]),
    (TRAIN, f"{TRAIN} --resume other-config", ["--quick", "--output-dir", "{fresh}", "--resume", "{tiny_ckpt}"]),
    # --- ch05.gpt_generate
    *[(GENERATE, f"{GENERATE} {' '.join(a)}", ["--model", "{tiny_ckpt}", *a]) for a in [
        ["--max-new-tokens", "-1"], ["--temperature", "-1"], ["--temperature", "nan"], ["--top-k", "0"],
        ["--top-p", "0"], ["--top-p", "1.5"], ["--prompt", ""], ["--prompt", "   "], ["--n-heads", "0"],
        ["--seed", "x"], ["--device", "tpu"], ["--device", ""],
        ["--prompt", "one two three four five six seven eight nine ten"],
    ]],
    *[(GENERATE, name, args) for name, args in _file_cases(GENERATE, "--model")],
    (GENERATE, f"{GENERATE} --model gpt5", ["--model", "gpt5"]),
    # --- ch05.gpt_download
    (DOWNLOAD, f"{DOWNLOAD} gpt5", ["gpt5"]),
    (DOWNLOAD, f"{DOWNLOAD} gpt2 gpt5", ["gpt2", "gpt5"]),
    (DOWNLOAD, f"{DOWNLOAD} --cache-dir file-parent", ["gpt2", "--cache-dir", "{file_parent}"]),
    (DOWNLOAD, f"{DOWNLOAD} offline, empty cache", ["gpt2", "--cache-dir", "{fresh}"]),
    (DOWNLOAD, f"{DOWNLOAD} --bogus", ["--bogus"]),
    # --- ch06.gpt_class_finetune
    *[(CLASSIFY, f"{CLASSIFY} {' '.join(a)}", ["--quick", *a]) for a in [
        ["--epochs", "0"], ["--lr", "nan"], ["--eval-freq", "0"], ["--batch-size", "0"], ["--max-length", "0"],
        ["--trainable", "everything"], ["--n-heads", "0"], ["--checkpoint-every", "0"], ["--weight-decay", "inf"],
        ["--output-dir", "{file_parent}"], ["--output-dir", "{finished6}"], ["--device", "tpu"],
        ["--device", ""], ["--output-dir", ""], ["--output-dir", "{interrupted}"],
    ]],
    *[(CLASSIFY, name, ["--quick", *args]) for name, args in _file_cases(CLASSIFY, "--init-checkpoint")],
    (CLASSIFY, f"{CLASSIFY} --resume text", ["--quick", "--resume", "{text}"]),
    # --- ch07.gpt_instruction_finetuning
    *[(INSTRUCT, f"{INSTRUCT} {' '.join(a)}", ["--quick", *a]) for a in [
        ["--epochs", "0"], ["--lr", "inf"], ["--max-new-tokens", "-1"], ["--num-test", "0"],
        ["--prompt-style", "chatml"], ["--batch-size", "0"], ["--eval-iter", "0"],
        ["--output-dir", "{file_parent}"], ["--output-dir", "{finished7}"], ["--n-heads", "4"], ["--n-heads", "0"],
        ["--device", ""], ["--output-dir", ""], ["--output-dir", "{interrupted}"],
    ]],
    *[(INSTRUCT, name, ["--quick", *args]) for name, args in _file_cases(INSTRUCT, "--init-checkpoint")],
    (INSTRUCT, f"{INSTRUCT} --resume empty", ["--quick", "--resume", "{empty}"]),
    # --- ch07.ollama_evaluate (no server is needed: all of these fail before asking one)
    *[(JUDGE, f"{JUDGE} {' '.join(a)}", a) for a in [
        ["--file", "{missing}"], ["--file", "{text}"], ["--file", "{json_trailing_comma}"],
        ["--file", "{json_not_records}"], ["--file", "{responses}", "--key", "answer"],
        ["--file", "{responses}", "--timeout", "0"], ["--file", "{responses}", "--timeout", "nan"],
        ["--file", "{responses}", "--host", "http://localhost:99999"], ["--file", "{responses}", "--model", ""],
        ["--file", "{responses}", "--key", ""], ["--bogus"],
        ["--file", "{responses}", "--scores", "{text}"], ["--file", "{responses}", "--scores", ""],
        ["--file", "{responses}", "--max-new-tokens", "0"],
        ["--file", "{responses}", "--api", "gpt"], ["--file", "{responses}", "--api", "openai", "--base-url", ""],
        ["--file", "{responses}", "--api", "openai", "--base-url", "ftp://127.0.0.1/v1"],
        ["--file", "{responses}", "--api", "openai", "--base-url", "http://localhost:99999/v1"],
        ["--file", "{responses}", "--api", "openai", "--host", "127.0.0.1:11434"],
        ["--file", "{responses}", "--base-url", "http://127.0.0.1:11435/v1"],
        ["--file", "{missing}", "--api", "openai"],
    ]],
    # --- ch07.dpo (a tiny instruction-tuned model; everything fails before training)
    *[(DPO, f"{DPO} {' '.join(a)}", ["--model", "{tiny_sft}", *a]) for a in [
        ["--epochs", "0"], ["--lr", "nan"], ["--weight-decay", "-1"], ["--batch-size", "0"], ["--eval-freq", "0"],
        ["--eval-iter", "0"], ["--beta", "0"], ["--beta", "-0.1"], ["--max-new-tokens", "-1"],
        ["--checkpoint-every", "0"], ["--device", "tpu"], ["--seed", "x"], ["--no-such-option"],
        ["--output-dir", "{file_parent}"], ["--output-dir", "{finished_dpo}"], ["--output-dir", ""],
        ["--output-dir", "{interrupted}"], ["--device", ""],
        ["--data", "{missing}"], ["--data", "{folder}"], ["--data", "{text}"], ["--data", "{json_not_records}"],
        ["--data", "{prefs_empty}"], ["--data", "{prefs_one}"],
        ["--resume", "{text}"], ["--resume", "{empty}"], ["--quick", "--resume", "{tiny_ckpt}", "--output-dir", "{fresh}"],
    ]],
    *[(DPO, name, args) for name, args in _file_cases(DPO, "--model") if "folder" not in name],
    (DPO, f"{DPO} without --model", []),
    # --- ch07.dpo.preference_data (no server is needed: all of these fail before asking one)
    *[(PAIRS, f"{PAIRS} {' '.join(a)}", a) for a in [
        ["--limit", "0"], ["--limit", "-2"], ["--timeout", "0"], ["--max-new-tokens", "0"], ["--max-tokens", "8"],
        ["--host", "http://localhost:99999"], ["--model", ""], ["--seed", "x"], ["--bogus"],
        ["--data", "{missing}"], ["--data", "{text}"], ["--data", "{json_trailing_comma}"],
        ["--output", "{text}"], ["--output", "{folder}"], ["--output", "{file_parent}"], ["--output", ""],
    ]],
]


def make_fixtures(folder: Path) -> dict[str, str]:
    """The files the cases refer to, made in `folder` (a tiny trained checkpoint among them)."""
    import torch

    from ch04.gpt import GPTModel
    from llmfs.checkpoint import save_checkpoint, save_model
    from llmfs.finetuning import save_with_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.pth").write_bytes(b"")
    (folder / "notes.pth").write_text("these are my notes, not a model\n")
    (folder / "bad.safetensors").write_bytes(b"\xff" * 64)
    (folder / "a-folder").mkdir(exist_ok=True)
    (folder / "plain-file").write_text("x")
    torch.manual_seed(123)
    model = GPTModel(TINY_CFG)
    save_model(model, folder / "tiny" / "model.pth")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A checkpoint as the trainer writes it (model, optimizer, config), at the start of epoch 1.
    save_checkpoint(folder / "tiny" / "checkpoint.pth", model, optimizer, global_step=0, epoch=0,
                    batch_in_epoch=1, tokens=0, examples=0, num_epochs=1, steps_per_epoch=2,
                    history={"train_losses": [], "val_losses": [], "tokens_seen": []},
                    rng_state=torch.get_rng_state(), rng_epoch_start=torch.get_rng_state(), config=TINY_CFG)
    # A chapter-7 model (as chapter 7 saves them), with room for a DPO prompt and answer
    save_with_config(GPTModel({**TINY_CFG, "context_length": 128}), folder / "tiny-sft" / "tiny-sft.pth",
                     style="alpaca")
    for chapter, name in (("5", "model.pth"), ("6", "review_classifier.pth"), ("7", "quick-sft.pth"),
                          ("_dpo", "quick-sft-dpo.pth")):
        (folder / f"finished{chapter}").mkdir(exist_ok=True)
        (folder / f"finished{chapter}" / name).write_bytes(b"a trained model")
    pair = {"instruction": "Say hi.", "input": "", "output": "Hi!", "chosen": "Hello!", "rejected": "What."}
    (folder / "prefs-empty.json").write_text("[]")
    (folder / "prefs-one.json").write_text(json.dumps([pair]))
    (folder / "interrupted").mkdir(exist_ok=True)  # what Ctrl-C leaves: a checkpoint, no model yet
    (folder / "interrupted" / "checkpoint.pth").write_bytes((folder / "tiny" / "checkpoint.pth").read_bytes())
    (folder / "trailing-comma.json").write_text('[\n  {"instruction": "a",\n   "output": "b",}\n]\n')
    (folder / "not-records.json").write_text('{"instruction": "a"}')
    (folder / "responses.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!",
                                                        "model_response": "Hello"}]))
    return {
        "empty": str(folder / "empty.pth"), "text": str(folder / "notes.pth"),
        "bad_st": str(folder / "bad.safetensors"), "folder": str(folder / "a-folder"),
        "missing": str(folder / "no-such-file.pth"), "file_parent": str(folder / "plain-file" / "out"),
        "tiny_model": str(folder / "tiny" / "model.pth"), "tiny_ckpt": str(folder / "tiny" / "checkpoint.pth"),
        "finished5": str(folder / "finished5"), "finished6": str(folder / "finished6"),
        "finished7": str(folder / "finished7"), "finished_dpo": str(folder / "finished_dpo"),
        "tiny_sft": str(folder / "tiny-sft" / "tiny-sft.pth"), "json_trailing_comma": str(folder / "trailing-comma.json"),
        "json_not_records": str(folder / "not-records.json"), "responses": str(folder / "responses.json"),
        "fresh": str(folder / "fresh"), "interrupted": str(folder / "interrupted"),
        "prefs_empty": str(folder / "prefs-empty.json"), "prefs_one": str(folder / "prefs-one.json"),
    }


def fill(args: list[str], files: dict[str, str]) -> list[str]:
    return [a.format(**files) if "{" in a else a for a in args]


def case_env(folder: Path) -> dict[str, str]:
    """No network, no GPU surprises, outputs in `folder`: what every case runs under."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "LLMFS_DEVICE": "cpu", "PYTHONUTF8": "1",
            "LLMFS_OUTPUT_DIR": str(folder / "outputs"), "OLLAMA_HOST": "127.0.0.1:9", "MPLBACKEND": "Agg"}


def problems(rc: int, stderr: str) -> list[str]:
    """What is wrong with a case's outcome (empty: exit 2, one `error:` line, no traceback)."""
    found = []
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("settings from the environment:"):  # llmfs.cli.run's first line
        lines = lines[1:]
    if rc != 2:
        found.append(f"exit code {rc}")
    if "Traceback" in stderr:
        found.append("traceback")
    if len(lines) != 1 or not lines[0].startswith("error:"):
        found.append(f"{len(lines)} stderr lines, not one 'error: ...': {stderr[-300:]!r}")
    return found


def run_subprocess(module: str, args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)
    return proc.returncode, proc.stderr, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", default="", help="only the cases whose id contains this text")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.k in c[1]]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="cli-cases-") as tmp:
        folder = Path(tmp)
        files = make_fixtures(folder)
        env = case_env(folder)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = pool.map(lambda c: run_subprocess(c[0], fill(c[2], files), env), cases)
            for (module, name, _), (rc, stderr, seconds) in zip(cases, results):  # in order, as they finish
                wrong = problems(rc, stderr)
                failed += bool(wrong)
                first = stderr.strip().splitlines()[0][:90] if stderr.strip() else ""
                print(f"{'FAIL' if wrong else 'ok  '} {seconds:5.1f}s  {name}\n      {'; '.join(wrong) or first}",
                      flush=True)
    print(f"\n{len(cases) - failed} of {len(cases)} cases exit 2 with one error line and no traceback")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
