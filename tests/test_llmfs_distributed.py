"""The chapter-5 trainer under torchrun: 2 CPU processes (gloo), DistributedDataParallel.

Checks that the ranks stay in sync (identical weights at the end) and that the loss
falls like a single-process run with the same global batch (2 ranks x 1 = 1 process x 2).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from llmfs.runtime import distributed_backend

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from llmfs.download import get_data_file
    from ch05.gpt_train import DEFAULT_SETTINGS
    from ch05.cli import pretrain as main

    out, batch_size = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": False}
    settings = {**DEFAULT_SETTINGS, "learning_rate": 2e-3, "num_epochs": 2, "batch_size": batch_size,
                "eval_freq": 10, "eval_iter": 2}
    text = get_data_file("the-verdict.txt").read_text(encoding="utf-8")
    rank = int(os.environ.get("RANK", "0"))
    result = main(cfg, settings, os.path.join(out, "run"), device="cpu", text=text, progress=False)
    weights = torch.cat([p.detach().flatten() for p in result["model"].state_dict().values()])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"val_losses": result["val_losses"],
                   "hash": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMFS_DEVICE": "cpu", "MASTER_ADDR": "127.0.0.1",
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo" if sys.platform == "linux" else "")}
    if not env["GLOO_SOCKET_IFNAME"]:
        env.pop("GLOO_SOCKET_IFNAME")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_backend_is_gloo_without_cuda():
    import torch

    if not torch.cuda.is_available():
        assert distributed_backend() == "gloo"


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
          f"--master_port={_free_port()}", str(script), str(ddp_dir), "1"], tmp_path)
    _run([sys.executable, str(script), str(single_dir), "2"], tmp_path)

    rank0 = json.loads((ddp_dir / "rank0.json").read_text())
    rank1 = json.loads((ddp_dir / "rank1.json").read_text())
    single = json.loads((single_dir / "rank0.json").read_text())
    assert rank0["hash"] == rank1["hash"], "DDP ranks ended with different weights"
    # Validation data is not sharded, so both ranks measure the same losses.
    assert rank0["val_losses"] == rank1["val_losses"]
    assert rank0["val_losses"][-1] < rank0["val_losses"][0] - 2.0  # it learns
    # Same global batch, same number of steps: the curves agree up to the different batch composition.
    assert len(rank0["val_losses"]) == len(single["val_losses"])
    assert rank0["val_losses"][-1] == pytest.approx(single["val_losses"][-1], rel=0.1)
    assert (ddp_dir / "run" / "model.pth").is_file()  # only rank 0 writes, and it does


@pytest.mark.parametrize("args, message", [
    (["--quick", "--lr", "nan"], "error: argument --lr: must be a finite number > 0, got nan"),
    (["--quick", "--output-dir", ""], "error: --output-dir is empty"),
])
def test_a_bad_option_under_torchrun_is_said_once(args, message, tmp_path):
    """Every process refuses the same option; only the first says so (torchrun adds its own report)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMFS_DEVICE": "cpu", "LLMFS_OUTPUT_DIR": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ch05.gpt_train", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
