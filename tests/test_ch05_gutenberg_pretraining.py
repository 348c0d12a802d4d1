"""ch05/gutenberg/pretraining_simple.py: training from memory-mapped shards.

A tiny corpus (the-verdict cut into documents) is prepared with `prepare_dataset` into small shards, then:
the dataset's windows are the book's `GPTDatasetV1` windows of the shards' stream (also across shard ends);
the shuffle is seeded; a run stopped after k steps and resumed equals one run of N steps (losses, learning
rates, weights); the loop equals appendix D's `train_model` (learning rates exactly, losses closely); the
TensorBoard events hold the expected tags and values, without duplicates after a resume; the loss falls;
bad input is one line before any work.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from appendix_d.training import train_model as appendix_d_train_model
from ch02.dataloader import GPTDatasetV1
from ch02.tokenizer import get_gpt2_tokenizer
from ch04.gpt import QUICK_CONFIG, GPTModel
from ch05.gutenberg import pretraining_simple as ps
from ch05.gutenberg.prepare_dataset import ShardSet, prepare
from llmfs.download import get_data_file
from llmfs.runtime import set_seed

REPO = Path(__file__).resolve().parents[1]
TINY = {**QUICK_CONFIG, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 1, "drop_rate": 0.1}
SETTINGS = {**ps.QUICK_SETTINGS, "batch_size": 2, "max_steps": 12, "eval_freq": 3, "eval_iter": 1,
            "warmup_steps": 3, "print_sample_iter": None}


def stream(folder: Path, split: str) -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return np.concatenate([np.fromfile(folder / s["file"], dtype="<u2") for s in manifest["shards"]
                           if s["split"] == split]).astype(np.int64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """the-verdict as 12 documents, prepared into shards of ~300 tokens, a third of the documents for val."""
    root = tmp_path_factory.mktemp("pretraining")
    books = root / "books"
    books.mkdir()
    paragraphs = get_data_file("the-verdict.txt").read_text(encoding="utf-8").split("\n\n")
    for i in range(12):
        part = paragraphs[i * len(paragraphs) // 12:(i + 1) * len(paragraphs) // 12]
        (books / f"book{i:02d}.txt").write_text("\n\n".join(part), encoding="utf-8")
    prepare(books, root / "shards", workers=1, shard_tokens=300, val_fraction=0.3, progress=False)
    return root / "shards"


class IdsTokenizer:
    """Hands GPTDatasetV1 the shards' ids as if it had tokenized a text."""

    def __init__(self, ids):
        self.ids = ids

    def encode(self, text, allowed_special=None):
        return list(self.ids)


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 5), (7, 11)])
def test_windows_are_the_books_windows_over_the_shards(shards, max_length, stride):
    ids = stream(shards, "train")
    dataset = ps.ShardDataset(ShardSet(shards).memmaps("train"), max_length, stride)
    book = GPTDatasetV1("", IdsTokenizer(ids), max_length, stride)
    assert len(dataset) == len(book) == len(range(0, len(ids) - max_length, stride))
    for i in range(len(dataset)):
        inputs, targets = dataset[i]
        assert torch.equal(inputs, book.input_ids[i]) and torch.equal(targets, book.target_ids[i])
    # Some windows span two shards; the decoded windows are the decoded stream.
    ends = np.cumsum([len(m) for m in ShardSet(shards).memmaps("train")])[:-1]
    assert any(i * stride < e < i * stride + max_length + 1 for i in range(len(dataset)) for e in ends)
    tokenizer = get_gpt2_tokenizer()
    whole = tokenizer.decode(ids.tolist())
    assert tokenizer.decode(dataset.window(len(dataset) - 1).tolist()) in whole
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def batches(loader):
    return [torch.cat([x, y], 1) for x, y in loader]


def test_seeded_shuffle_and_contiguous_order(shards):
    s = ShardSet(shards)
    one, _ = ps.create_dataloaders(s, 2, 16, generator=torch.Generator().manual_seed(1))
    two, _ = ps.create_dataloaders(s, 2, 16, generator=torch.Generator().manual_seed(1))
    other, _ = ps.create_dataloaders(s, 2, 16, generator=torch.Generator().manual_seed(2))
    first = batches(one)
    assert all(torch.equal(a, b) for a, b in zip(first, batches(two), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(other), strict=True))
    ordered, val = ps.create_dataloaders(s, 2, 16, shuffle=False)
    ids = torch.from_numpy(stream(shards, "train"))
    x, _ = next(iter(ordered))
    assert torch.equal(x[1], ids[16:32]) and len(ordered) == len(ordered.dataset) // 2
    xv, yv = next(iter(val))
    assert torch.equal(yv[0], torch.from_numpy(stream(shards, "val"))[1:17])


def run(shards, out, **kwargs):
    return ps.train_model_from_shards(TINY, SETTINGS, shards, out, device="cpu", progress=False, **kwargs)


def test_resume_is_exact_and_the_schedule_is_appendix_ds(shards, tmp_path, capsys):
    lrs_whole, lrs_parts = [], []
    whole = run(shards, tmp_path / "whole", on_lr=lrs_whole, log_dir=tmp_path / "tb_whole")
    part = run(shards, tmp_path / "part", stop_after=5, on_lr=lrs_parts, log_dir=tmp_path / "tb_part")
    assert part["global_step"] == 4
    resumed = run(shards, tmp_path / "part", resume=tmp_path / "part" / "checkpoint.pth", on_lr=lrs_parts,
                  log_dir=tmp_path / "tb_part")
    assert resumed["global_step"] == whole["global_step"] == SETTINGS["max_steps"] - 1
    for key in ("train_losses", "val_losses", "tokens_seen", "lrs"):
        assert resumed[key] == whole[key], key
    assert lrs_parts == lrs_whole and len(lrs_whole) == SETTINGS["max_steps"]
    for (name, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    # Appendix D's formula: warm-up from initial_lr, the peak, cosine down towards min_lr.
    peak, w, total = SETTINGS["learning_rate"], SETTINGS["warmup_steps"], SETTINGS["max_steps"]
    inc = (peak - SETTINGS["initial_lr"]) / w
    expected = [SETTINGS["initial_lr"] + s * inc if s < w else SETTINGS["min_lr"] + (peak - SETTINGS["min_lr"]) * 0.5
                * (1 + math.cos(math.pi * (s - w) / (total - w))) for s in range(total)]
    assert lrs_whole == pytest.approx(expected, rel=1e-12) and lrs_whole[w] == peak
    # TensorBoard: the tags, the values of the history, no step twice after the resume.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder in ("tb_whole", "tb_part"):
        events = EventAccumulator(str(tmp_path / folder))
        events.Reload()
        assert set(events.Tags()["scalars"]) == {"loss/train", "loss/val", "lr", "tokens_per_s"}
        train = events.Scalars("loss/train")
        assert [e.step for e in train] == list(range(0, total, SETTINGS["eval_freq"]))
        assert [e.value for e in train] == pytest.approx(whole["train_losses"], rel=1e-6)
        assert [e.value for e in events.Scalars("lr")] == pytest.approx(whole["lrs"], rel=1e-6)
        assert all(e.value > 0 for e in events.Scalars("tokens_per_s"))
    out = capsys.readouterr().out
    assert "tokens/s, ETA " in out and "resumed from" in out
    assert not (tmp_path / "whole" / "loss.png").exists()


def test_the_loop_is_appendix_ds_train_model(shards, tmp_path, capsys):
    """Same model, same batches: appendix D's listing and this run give the same rates and losses."""
    settings = {**SETTINGS, "max_steps": None, "num_epochs": 1, "eval_freq": 4, "batch_size": 8}
    cfg = {**TINY, "context_length": 32}
    lrs = []
    ours = ps.train_model_from_shards(cfg, settings, shards, tmp_path / "ours", device="cpu", progress=False,
                                      on_lr=lrs)
    set_seed(settings["seed"])
    model = GPTModel(cfg)
    train_loader, val_loader = ps.create_dataloaders(
        ShardSet(shards), settings["batch_size"], cfg["context_length"],
        generator=torch.Generator().manual_seed(settings["seed"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=0.1)
    train_losses, val_losses, _, track_lrs = appendix_d_train_model(
        model, train_loader, val_loader, optimizer, "cpu", n_epochs=1, eval_freq=4, eval_iter=1,
        start_context="", tokenizer=None, warmup_steps=settings["warmup_steps"], print_samples=False)
    assert len(lrs) == len(train_loader) > 2 * settings["warmup_steps"]
    assert lrs == pytest.approx(track_lrs, rel=1e-12)
    assert ours["train_losses"] == pytest.approx(train_losses, abs=1e-4)
    assert ours["val_losses"] == pytest.approx(val_losses, abs=1e-4)
    assert (tmp_path / "ours" / "loss.png").exists()  # chapter 5's plot without --log-dir


def test_loss_falls(shards, tmp_path):
    settings = {**SETTINGS, "max_steps": 40, "eval_freq": 39, "eval_iter": 4, "learning_rate": 1e-2,
                "batch_size": 4}
    result = ps.train_model_from_shards({**TINY, "drop_rate": 0.0}, settings, shards, tmp_path, device="cpu",
                                        progress=False)
    assert result["train_losses"][-1] < result["train_losses"][0] - 2.0
    assert result["val_losses"][-1] < result["val_losses"][0] - 1.5


def cli(argv, capsys):
    try:
        code = ps.main(argv)
    except SystemExit as exc:  # the parser's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code, err):
    lines = [line for line in err.splitlines() if not line.startswith("settings from the environment")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_line_before_any_work(shards, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--quick", "--no-progress", "--device", "cpu", "--output-dir", str(out)]
    assert "not a folder" in one_error(*cli([*base, "--data-dir", str(tmp_path / "nope")], capsys)[::2])
    (tmp_path / "empty").mkdir()
    assert "not a prepared folder" in one_error(*cli([*base, "--data-dir", str(tmp_path / "empty")], capsys)[::2])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "progress.json").write_text("{}", encoding="utf-8")
    assert "unfinished preparation" in one_error(*cli([*base, "--data-dir", str(tmp_path / "half")], capsys)[::2])
    line = one_error(*cli([*base, "--data-dir", str(shards), "--context-length", "1000"], capsys)[::2])
    assert "the val shards hold 977 tokens: 0 window(s)" in line and "--val-fraction" in line
    line = one_error(*cli([*base, "--data-dir", str(shards), "--context-length", "1000", "--batch-size", "8"],
                          capsys)[::2])
    assert "the train shards hold 4,158 tokens: 4 window(s)" in line and "--batch-size" in line
    assert "--context-length 2000" in one_error(*cli([*base, "--data-dir", str(shards), "--context-length", "2000"],
                                                     capsys)[::2])
    assert "--sampling" in one_error(*cli([*base, "--data-dir", str(shards), "--sampling", "x"], capsys)[::2])
    assert "--warmup-steps" in one_error(*cli([*base, "--data-dir", str(shards), "--warmup-steps", "-1"], capsys)[::2])
    assert not out.exists()
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1.x").write_bytes(b"")
    line = one_error(*cli([*base, "--data-dir", str(shards), "--log-dir", str(tmp_path / "tb")], capsys)[::2])
    assert "already holds TensorBoard events" in line and not out.exists()
    out.mkdir()
    (out / "model.pth").write_bytes(b"x")
    assert "already holds a trained model" in one_error(*cli([*base, "--data-dir", str(shards)], capsys)[::2])
    assert (out / "model.pth").read_bytes() == b"x"


def test_command_trains_and_writes_tensorboard(shards, tmp_path, capsys):
    code, out, err = cli(["--quick", "--no-progress", "--device", "cpu", "--data-dir", str(shards), "--output-dir",
                          str(tmp_path / "run"), "--max-steps", "4", "--eval-freq", "2", "--batch-size", "2",
                          "--context-length", "16", "--print-sample-iter", "1000", "--log-dir", str(tmp_path / "tb")],
                         capsys)
    assert code == 0, err
    assert "Step 000002" in out and "tokens/s" in out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pth", "config.json", "model.pth"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


NOTEBOOK = REPO / "ch05" / "gutenberg" / "pretraining-on-gutenberg.ipynb"


def stored_outputs(cell_id: str) -> str:
    cells = {c["id"]: c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]}
    return "".join("".join(o.get("text", "")) for o in cells[cell_id].get("outputs", []))


def test_notebook_outputs_agree_with_a_recomputation(tmp_path):
    """The stored (quick-mode) outputs: the library and its preparation recomputed here give the same
    counts, the interrupted run was resumed, the loss fell, and the TensorBoard tags were read back."""
    assert "quick mode: True" in stored_outputs("pretrain-01")
    files = ps.write_demo_library(tmp_path / "books", max_chars=60_000, doc_chars=6_000)
    assert f"{len(files)} files:" in stored_outputs("pretrain-03")
    manifest = prepare(tmp_path / "books", tmp_path / "shards", workers=1, shard_tokens=4_000, val_fraction=0.3,
                       progress=False)
    prepared = stored_outputs("pretrain-05")
    assert str({k: manifest[k] for k in ("documents", "tokens")}) in prepared
    assert str(manifest["skipped"]) in prepared and manifest["skipped"] == {"empty": 1, "binary": 1}
    assert "Gutenberg boilerplate left: False" in stored_outputs("pretrain-07")
    assert f"<|endoftext|> tokens: {manifest['documents']} documents: {manifest['documents']}" in \
        stored_outputs("pretrain-07")
    assert "step 12 of 24" in stored_outputs("pretrain-11")
    resumed = stored_outputs("pretrain-12")
    assert "resumed from" in resumed and "step 24 of 24" in resumed
    first, last = (float(x) for x in re.search(r"loss: train ([\d.]+) -> ([\d.]+)", resumed).groups())
    assert last < first - 1.0
    assert "['loss/train', 'loss/val', 'lr', 'tokens_per_s']" in stored_outputs("pretrain-15")


def test_ctrl_c_writes_a_checkpoint_and_the_printed_command_resumes_exactly(shards, tmp_path, capsys, monkeypatch):
    args = ["--quick", "--no-progress", "--device", "cpu", "--data-dir", str(shards), "--max-steps", "8",
            "--eval-freq", "2", "--batch-size", "2", "--context-length", "16", "--print-sample-iter", "1000"]
    assert cli([*args, "--output-dir", str(tmp_path / "whole")], capsys)[0] == 0
    real, calls = ps.calc_loss_batch, []

    def ctrl_c_at_the_fourth_step(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the step finishes, then the trainer saves and stops
        return real(*a, **k)

    monkeypatch.setattr(ps, "calc_loss_batch", ctrl_c_at_the_fourth_step)
    part = tmp_path / "part"
    code, out, err = cli([*args, "--output-dir", str(part)], capsys)
    assert code == 130 and "interrupted: SIGINT after step 4" in err and (part / "checkpoint.pth").exists()
    assert not (part / "model.pth").exists()
    command = next(line for line in err.splitlines() if line.startswith("resume with: "))
    words = shlex.split(command)  # resume with: python -m MODULE (the module pytest runs as, here) ARGS
    assert words[2:4] == ["python", "-m"]
    argv = words[5:]
    assert argv[-2:] == ["--resume", str(part / "checkpoint.pth")]
    monkeypatch.setattr(ps, "calc_loss_batch", real)
    code, out, err = cli(argv, capsys)
    assert code == 0 and "resumed from" in out, err
    whole = torch.load(tmp_path / "whole" / "model.pth", weights_only=True)
    resumed = torch.load(part / "model.pth", weights_only=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_fsdp_under_torchrun_two_processes_equal_one(shards, tmp_path):
    """`torchrun ... --fsdp`: the same global batch on 2 processes as on 1 gives the same val losses and final
    weights; only the first process writes the TensorBoard events and model.pth; the checkpoint is checkpoint.dcp."""
    from test_llmfs_distributed import _free_port
    from test_llmfs_distributed_fsdp import RTOL, _env

    # The command, without dropout (each process draws its own masks: 1 and 2 processes would differ by them).
    script = tmp_path / "no_dropout.py"
    script.write_text("import sys\nfrom ch05.gutenberg import pretraining_simple as ps\n"
                      "ps.QUICK_CONFIG = {**ps.QUICK_CONFIG, 'drop_rate': 0.0}\nsys.exit(ps.main())\n")

    def torchrun(nproc: int, name: str) -> tuple[list[float], dict]:
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
             f"--master_port={_free_port()}", str(script), "--fsdp", "--quick",
             "--no-progress", "--device", "cpu", "--data-dir", str(shards), "--output-dir", str(out), "--max-steps",
             "6", "--eval-freq", "2", "--batch-size", "4", "--context-length", "16", "--print-sample-iter", "1000",
             "--log-dir", str(out / "tb")],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (out / "checkpoint.dcp").is_dir() and len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
        assert proc.stdout.count("Step 000002") == 1 and f"{nproc} processes (FSDP)" in proc.stdout
        val = [float(v) for v in re.findall(r"Val loss ([\d.]+)", proc.stdout)]
        return val, torch.load(out / "model.pth", weights_only=True)

    val2, weights2 = torchrun(2, "two")
    val1, weights1 = torchrun(1, "one")
    assert len(val1) == 3 and val1 == pytest.approx(val2, abs=1.5e-3)  # printed with 3 decimals
    for key, value in weights1.items():
        assert torch.allclose(value, weights2[key], rtol=RTOL, atol=1e-6), key


def test_module_docstring_commands_parse():
    """Every command line of the module's docstring parses with its parser (the book's spellings too)."""
    lines = [line.strip() for line in ps.__doc__.splitlines() if "-m ch05.gutenberg.pretraining_simple" in line]
    assert len(lines) == 2
    for line in lines:
        argv = [w.strip("[]") for w in line.split("pretraining_simple", 1)[1].split()]
        args = ps.parser().parse_args([a for a in argv if a])
        assert args.data_dir == Path("SHARDS")
    args = ps.parser().parse_args(["--data_dir", "d", "--n_epochs", "2", "--save-ckpt-freq", "5"])
    assert (args.data_dir, args.epochs, args.save_ckpt_freq) == (Path("d"), 2, 5)
