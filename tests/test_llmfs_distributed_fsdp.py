"""The chapter-5 run sharded with FSDP2 (`--fsdp`) under torchrun: 2 CPU processes (gloo).

* DDP and FSDP on 2 processes give the losses of one process training on the same global batches
  (the batches the sharded sampler draws, with one rank), to a relative 1e-5: the step's loss is
  the mean of the two processes' losses on their halves of the batch.
* A sharded checkpoint written by 2 processes in the middle of an epoch resumes with 2 and with 1
  process and gives the losses of the uninterrupted run; a SIGINT on one process stops both after
  the same step, with a checkpoint.
* The final model.pth is the usual single file (ch05.gpt_generate loads it) and holds the weights
  of the single-process run.
* `--fsdp` without torchrun, and with what it cannot honour, is refused with one line before any work.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_llmfs_distributed import _free_port

RTOL = 1e-5  # float32, two processes: the gradients are summed in another order than in one process

SCRIPT = textwrap.dedent("""
    import json, os, shutil, signal, sys
    import torch
    import ch05.cli as cli
    import llmfs.trainer as trainer
    from ch05.gpt_train import DEFAULT_SETTINGS
    from llmfs.cli import chapter_module
    from llmfs.distributed import DistInfo, cleanup, shard_loader
    from llmfs.download import get_data_file
    from llmfs.trainer import TrainingInterrupted

    mode, out, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume, copy_at, sigint_at = (sys.argv[4:] + ["-"] * 3)[:3]
    resume = None if resume == "-" else resume
    copy_at = None if copy_at == "-" else int(copy_at)  # keep a copy of the checkpoint after this step
    sigint_at = None if sigint_at == "-" else int(sigint_at)  # rank 1 gets SIGINT during this step
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    cfg = {"vocab_size": 50257, "context_length": 128, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": False}
    settings = {**DEFAULT_SETTINGS, "learning_rate": 2e-3, "num_epochs": 1, "batch_size": batch_size,
                "eval_freq": 100, "eval_iter": 1}
    listings = chapter_module("ch05.gpt_train")
    steps = []  # (global step, this process's training loss)
    calc_loss_batch = listings.calc_loss_batch

    def recording(inputs, targets, model, device):
        loss = calc_loss_batch(inputs, targets, model, device)
        if model.training:  # not the evaluations
            step = (steps[-1][0] + 1) if steps else first_step
            steps.append((step, loss.item()))
            if step == sigint_at and rank == 1:
                os.kill(os.getpid(), signal.SIGINT)  # finishes the step, then every process saves and stops
        return loss

    listings.calc_loss_batch = recording
    first_step = 0
    if resume:
        first_step = torch.load(os.path.join(resume, "train_state.pth"), weights_only=True)["global_step"] + 1
    if mode == "single":  # one process, the batches the sharded sampler draws with one rank
        create = listings.create_train_val_loaders

        def same_batches(*args, **kwargs):
            train_loader, val_loader = create(*args, **kwargs)
            one = DistInfo(0, 0, 1, torch.device("cpu"))
            return shard_loader(train_loader, one, seed=settings["seed"]), val_loader

        listings.create_train_val_loaders = same_batches
    if copy_at is not None:
        save = trainer.save_sharded_checkpoint

        def save_and_copy(path, *args, global_step, **kwargs):
            saved = save(path, *args, global_step=global_step, **kwargs)
            if global_step == copy_at and rank == 0:
                shutil.copytree(saved, os.path.join(out, f"step{copy_at}.dcp"))
            return saved

        trainer.save_sharded_checkpoint = save_and_copy
    text = get_data_file("the-verdict.txt").read_text(encoding="utf-8")
    interrupted = None
    try:
        cli.pretrain(cfg, settings, os.path.join(out, "run"), device="cpu", text=text, progress=False,
                     resume=resume, checkpoint_every=copy_at and copy_at + 1, sample_tokens=3,
                     fsdp=mode == "fsdp")
    except TrainingInterrupted as exc:
        interrupted = exc.step
        cleanup()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": steps, "interrupted": interrupted}, f)
""")


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMFS_DEVICE": "cpu", "MASTER_ADDR": "127.0.0.1",
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo" if sys.platform == "linux" else "")}
    if not env["GLOO_SOCKET_IFNAME"]:
        env.pop("GLOO_SOCKET_IFNAME")
    return env


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


def _train(tmp_path, name, launcher, mode, batch_size, *extra):
    out = tmp_path / name
    out.mkdir()
    proc = subprocess.run([*launcher, str(tmp_path / "train.py"), mode, str(out), str(batch_size), *map(str, extra)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = sorted(out.glob("rank*.json"))
    runs = [json.loads(p.read_text()) for p in ranks]
    # The global batch's loss: the mean of the processes' losses on their equal parts of it.
    losses = {}
    for run in runs:
        for step, loss in run["steps"]:
            losses.setdefault(step, []).append(loss)
    return {"losses": {s: sum(v) / len(v) for s, v in losses.items()}, "interrupted": runs[0]["interrupted"],
            "out": out, "stdout": proc.stdout}


def _assert_close(got: dict, want: dict, what: str) -> None:
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in got)
    print(f"{what}: {len(got)} steps, largest relative difference {worst:.2e} (tolerance {RTOL:.0e})")
    assert set(got) <= set(want) and worst <= RTOL, (what, got, want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp")
    (tmp_path / "train.py").write_text(SCRIPT)
    single = _train(tmp_path, "single", [sys.executable], "single", 2)
    ddp = _train(tmp_path, "ddp", _torchrun(2), "ddp", 1)  # DDP: --batch-size is per process
    fsdp = _train(tmp_path, "fsdp", _torchrun(2), "fsdp", 2, "-", 7)  # FSDP: the global batch; keeps step 8's
    return {"tmp": tmp_path, "single": single, "ddp": ddp, "fsdp": fsdp}


def test_ddp_and_fsdp_losses_equal_one_process_on_the_same_global_batch(runs):
    single = runs["single"]["losses"]
    last = len(single) - 1
    assert sorted(single) == list(range(last + 1)) and last > 12  # a whole epoch
    assert single[last] < single[0] - 0.5  # it learns
    _assert_close(runs["ddp"]["losses"], single, "DDP, 2 processes vs 1")
    assert set(runs["fsdp"]["losses"]) == set(single)
    _assert_close(runs["fsdp"]["losses"], single, "FSDP, 2 processes vs 1")
    assert "Every effort moves you" in runs["fsdp"]["stdout"]  # the epoch's sample, printed once
    assert runs["fsdp"]["stdout"].count("Every effort moves you") == 1


def test_fsdp_writes_a_plain_model_file_with_the_weights_of_one_process(runs):
    from ch05.gpt_generate import load_model_for_generation

    run_dir = runs["fsdp"]["out"] / "run"
    assert (run_dir / "checkpoint.dcp" / ".metadata").is_file() and not (run_dir / "checkpoint.pth").exists()
    assert not list(run_dir.glob(".checkpoint.dcp.*"))  # no temporary folder left
    fsdp = torch.load(run_dir / "model.pth", weights_only=True)
    single = torch.load(runs["single"]["out"] / "run" / "model.pth", weights_only=True)
    assert fsdp.keys() == single.keys()
    worst = max(((fsdp[k] - single[k]).abs().max() / single[k].abs().max()).item() for k in single)
    print(f"FSDP model.pth vs one process: largest difference {worst:.2e} of a tensor's largest value")
    assert worst < 1e-4
    model, _ = load_model_for_generation(str(run_dir / "model.pth"), device="cpu")
    assert model.cfg["emb_dim"] == 32


def test_a_checkpoint_of_two_processes_resumes_on_two_and_on_one(runs):
    tmp, uninterrupted = runs["tmp"], runs["fsdp"]["losses"]
    step8 = runs["fsdp"]["out"] / "step7.dcp"
    assert sorted(p.name for p in step8.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # 2 processes from step 8; rank 1 gets SIGINT during step 12: both finish it, save, stop.
    two = _train(tmp, "resume2", _torchrun(2), "fsdp", 2, step8, "-", 11)
    assert two["interrupted"] == 11 and sorted(two["losses"]) == list(range(8, 12))
    saved = torch.load(two["out"] / "run" / "checkpoint.dcp" / "train_state.pth", weights_only=True)
    assert saved["global_step"] == 11 and saved["batch_in_epoch"] == 12
    _assert_close(two["losses"], uninterrupted, "resumed on 2 processes vs uninterrupted")
    # 1 process from the checkpoint that 2 wrote at step 8 (DCP re-slices it), to the end of the epoch.
    one = _train(tmp, "resume1", _torchrun(1), "fsdp", 2, step8)
    assert sorted(one["losses"]) == list(range(8, len(uninterrupted)))
    _assert_close(one["losses"], uninterrupted, "resumed on 1 process vs uninterrupted")


def test_fsdp_without_torchrun_is_refused_in_one_line(tmp_path):
    env = {**_env(), "LLMFS_OUTPUT_DIR": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "-m", "ch05.gpt_train", "--quick", "--fsdp"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()][-1:], proc.stderr
    assert errors[0].startswith("error: --fsdp shards the model across the processes torchrun starts; run it as "
                                "torchrun --nproc_per_node=N -m ch05.gpt_train --fsdp")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--fsdp", "--batch-size", "3"],
     "error: --fsdp: the batch size 3 is the global batch and must be divisible by the 2 processes"),
    (["--fsdp", "--resume", "checkpoint.pth"], "error: --fsdp resumes the checkpoint.dcp folder an --fsdp run writes"),
    (["--fsdp", "--resume", "missing.dcp"], "error: --resume missing.dcp does not exist"),
    (["--fsdp", "--resume", "empty"], "error: --resume empty is a folder but not a sharded checkpoint"),
    (["--resume", "checkpoint.dcp"], "error: --resume checkpoint.dcp is the sharded checkpoint of an --fsdp run; "
                                     "resume it with --fsdp"),
])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_what_fsdp_cannot_honour_is_said_once_before_any_work(args, message, rank, tmp_path, monkeypatch, capsys):
    """As under `torchrun --nproc_per_node=2` (its variables set): the first process says it, the other is
    silent, both stop with exit code 2 before the process group, the data or the output folder."""
    from ch05.cli import train_main

    for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "test", "LLMFS_OUTPUT_DIR": str(tmp_path / "out")
                        }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint.pth").write_bytes(b"PK")
    (tmp_path / "empty").mkdir()
    (tmp_path / "checkpoint.dcp").mkdir()
    for name in (".metadata", "train_state.pth"):
        (tmp_path / "checkpoint.dcp" / name).write_bytes(b"x")
    assert train_main(["--quick", *args]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    if rank == "0":
        assert len(errors) == 1 and errors[0].startswith(message), captured.err
    else:
        assert errors == []
    assert captured.out == "" and not (tmp_path / "out").exists()
