"""Appendix A: the toy network, data set, training loop and the DDP script (1 and 2 CPU processes)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from appendix_a.toy import (
    NeuralNetwork,
    ToyDataset,
    compute_accuracy,
    flat_weights,
    make_toy_data,
    make_toy_loaders,
    train,
    weights_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]
DDP_SCRIPT = REPO / "appendix-A" / "DDP-script.py"


def load_ddp_script():
    spec = importlib.util.spec_from_file_location("ddp_script", DDP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parameter_counts_and_output_shape():
    model = NeuralNetwork(50, 3)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 50 * 30 + 30 + 30 * 20 + 20 + 20 * 3 + 3
    assert sum(p.numel() for p in model.parameters()) == 2213
    assert sum(p.numel() for p in NeuralNetwork(2, 2).parameters()) == 752
    assert model(torch.rand(4, 50)).shape == (4, 3)


def test_toy_dataset_and_data():
    X_train, y_train, X_test, y_test = make_toy_data()
    assert X_train.shape == (5, 2) and y_train.tolist() == [0, 0, 0, 1, 1]
    assert X_test.shape == (2, 2) and y_test.tolist() == [0, 1]
    ds = ToyDataset(X_train, y_train)
    assert len(ds) == 5
    x, y = ds[3]
    assert torch.equal(x, X_train[3]) and y.item() == 1
    with pytest.raises(ValueError):
        ToyDataset(X_train, y_test)
    train_loader, test_loader = make_toy_loaders(batch_size=2)
    assert len(train_loader) == 2 and len(test_loader) == 1  # 5 // 2 full batches, last one dropped


def test_train_loader_is_seeded():
    order = [[y.tolist() for _, y in make_toy_loaders(seed=7)[0]] for _ in range(2)]
    assert order[0] == order[1]


def test_compute_accuracy_counts_argmax_hits():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))  # predicts class 1 when x1 > 0
    X = torch.tensor([[-1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [-4.0, 0.0]])
    y = torch.tensor([0, 1, 0, 0])
    assert compute_accuracy(model, DataLoader(ToyDataset(X, y), batch_size=3)) == 0.75


def test_toy_training_reaches_full_accuracy():
    torch.manual_seed(123)
    model = NeuralNetwork(2, 2)
    train_loader, test_loader = make_toy_loaders()
    losses = train(model, train_loader, num_epochs=3, lr=0.5)
    assert len(losses) == 3 * 2
    assert losses[-1] < losses[0] / 5
    X_train, y_train, _, _ = make_toy_data()
    assert compute_accuracy(model, DataLoader(ToyDataset(X_train, y_train), batch_size=2)) == 1.0
    assert compute_accuracy(model, test_loader) == 1.0


def test_state_dict_roundtrip(tmp_path):
    torch.manual_seed(123)
    model = NeuralNetwork(2, 2)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    restored = NeuralNetwork(2, 2)
    restored.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    assert torch.equal(flat_weights(model), flat_weights(restored))
    assert weights_fingerprint(model) == weights_fingerprint(restored)
    with torch.no_grad():
        restored.layers[0].bias.add_(1e-3)
    assert weights_fingerprint(model)[0] != weights_fingerprint(restored)[0]


def test_flat_weights_length():
    assert flat_weights(NeuralNetwork(2, 2)).shape == (752,)


@pytest.fixture(scope="module")
def single_process_result(tmp_path_factory):
    """`python DDP-script.py` without torchrun: a one-process Gloo group, run in this process."""
    out = tmp_path_factory.mktemp("ddp1")
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    device = os.environ.get("LLMFS_DEVICE")
    os.environ["LLMFS_DEVICE"] = "cpu"
    try:
        assert load_ddp_script().main(["--out", str(out)]) == 0
    finally:
        os.environ.update(saved)
        if device is None:
            os.environ.pop("LLMFS_DEVICE", None)
        else:
            os.environ["LLMFS_DEVICE"] = device
    assert not torch.distributed.is_initialized()  # destroy_process_group ran
    return json.loads((out / "rank0.json").read_text(encoding="utf-8"))


def test_ddp_script_single_process(single_process_result):
    r = single_process_result
    assert (r["rank"], r["world_size"], r["backend"]) == (0, 1, "gloo")
    assert r["train_acc"] == 1.0 and r["test_acc"] == 1.0
    assert len(r["weights"]) == 752


def test_ddp_script_two_cpu_processes(tmp_path, single_process_result):
    # About 6 s on an idle 2-core machine (three Python processes import torch); more under load.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMFS_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(DDP_SCRIPT), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text(encoding="utf-8")) for k in (0, 1))
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["backend"] == "gloo"
    # All-reduced gradients -> every replica takes the same steps -> bit-identical weights.
    assert r0["weights_sha256"] == r1["weights_sha256"]
    assert r0["weights"] == r1["weights"]
    # Both ranks evaluate the full sets; they agree, and match the single-process run.
    single = single_process_result
    assert (r0["train_acc"], r0["test_acc"]) == (r1["train_acc"], r1["test_acc"])
    assert (r0["train_acc"], r0["test_acc"]) == (single["train_acc"], single["test_acc"]) == (1.0, 1.0)
    assert "train accuracy 1.00" in proc.stdout



@pytest.mark.parametrize("argv, message", [
    (["--num-epochs", "-1"], "argument --num-epochs: must be a whole number >= 1, got -1"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--batch-size", "two"], "argument --batch-size: must be a whole number >= 1, got two"),
])
def test_ddp_script_bad_options_are_one_line_errors(argv, message):
    proc = subprocess.run([sys.executable, str(DDP_SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {message} (see --help)\n"


def test_ddp_script_refuses_an_unwritable_out_before_joining_the_group(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert load_ddp_script().main(["--out", str(tmp_path / "file" / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "cannot be written" in err and err.count("\n") == 1
    assert not torch.distributed.is_initialized()


def test_the_package_root_exports_the_main_names():
    """`from appendix_a import ...` works as with the book's package: the names are toy's objects."""
    import appendix_a
    from appendix_a import NeuralNetwork, toy

    assert NeuralNetwork is toy.NeuralNetwork
    assert {"NeuralNetwork", "ToyDataset"} <= set(appendix_a.__all__)
    for name in appendix_a.__all__:
        assert getattr(appendix_a, name) is getattr(toy, name), name
