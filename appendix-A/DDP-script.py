"""Appendix A.9: data-parallel training of the toy network with DistributedDataParallel.

Launch one process per device with torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT for every process):

    torchrun --nproc_per_node=2 appendix-A/DDP-script.py          # 2 processes
    python -m torch.distributed.run --nproc_per_node=2 appendix-A/DDP-script.py   # same thing
    python appendix-A/DDP-script.py                              # 1 process, no torchrun

The backend is chosen automatically: NCCL when CUDA is available and every local rank
gets its own GPU, otherwise Gloo on the CPU (so it also runs on a laptop and on Windows,
where NCCL does not exist; on Windows with PyTorch >= 2.4 set USE_LIBUV=0 before torchrun).
`LLMFS_DEVICE=cpu` forces Gloo on the CPU.

Each process trains the same model on its own shard of the data (DistributedSampler);
after every backward pass DDP averages the gradients across processes, so all copies
take the same optimizer step and end with identical weights. At the end every rank
prints its train/test accuracy and a hash of its weights; `--out DIR` also writes
rank<k>.json with the accuracies, the hash, the sum and the flattened weights. A bad option
(e.g. `--num-epochs -1`) is a one-line `error:` (said by the first process) and exit code 2 from every
process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

try:
    from appendix_a.toy import (
        NeuralNetwork,
        ToyDataset,
        compute_accuracy,
        flat_weights,
        make_toy_data,
        weights_fingerprint,
    )
except ImportError:  # project not installed: import the files next to this script instead
    HERE = Path(__file__).resolve().parent
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from toy import (
        NeuralNetwork,
        ToyDataset,
        compute_accuracy,
        flat_weights,
        make_toy_data,
        weights_fingerprint,
    )

from llmfs.atomic import atomic_write
from llmfs.cli import Parser, check_output_dir, path_argument, positive_float, positive_int, run
from llmfs.runtime import distributed_backend, get_device, set_seed


def log(message: str) -> None:
    # One write per line, so lines from different ranks do not interleave mid-line.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def keep_gloo_on_loopback() -> None:
    """When every rank runs on this machine (MASTER_ADDR is loopback), make Gloo talk over the
    loopback interface too, instead of whatever interface the host name resolves to."""
    if os.environ.get("MASTER_ADDR", "127.0.0.1") not in {"127.0.0.1", "localhost"} or "GLOO_SOCKET_IFNAME" in os.environ:
        return
    if sys.platform.startswith(("linux", "darwin")):
        names = {name for _, name in socket.if_nameindex()}
        for candidate in ("lo", "lo0"):
            if candidate in names:
                os.environ["GLOO_SOCKET_IFNAME"] = candidate
                return


def ddp_setup() -> tuple[int, int, torch.device, str]:
    """Join the process group; return (rank, world_size, device, backend)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))

    # NCCL needs one GPU per process; anything else (CPU, MPS, LLMFS_DEVICE=cpu, fewer GPUs
    # than processes on this machine) uses Gloo on the CPU.
    use_nccl = (distributed_backend() == "nccl" and get_device().type == "cuda"
                and torch.cuda.device_count() >= local_world_size)
    if use_nccl:
        backend = "nccl"
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # so NCCL and .cuda() calls use this rank's GPU
    else:
        backend = "gloo"
        device = torch.device("cpu")

    if sys.platform == "win32":
        os.environ.setdefault("USE_LIBUV", "0")  # Windows wheels are built without libuv
    if backend == "gloo":
        keep_gloo_on_loopback()
    if launched_by_torchrun():
        # env:// reads MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE that torchrun set
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    else:
        # Plain `python DDP-script.py`: a one-process group with an in-memory store (no ports)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world_size, device, backend


def main(argv: list[str] | None = None) -> int:
    """Parse the options and train; returns the exit code (2 with a one-line `error:` for a bad option)."""
    parser = Parser(prog="python appendix-A/DDP-script.py",
                    description="Data-parallel training of the appendix A toy network.")
    parser.add_argument("--num-epochs", type=positive_int, default=3, help="passes over the data (default 3)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="examples per process and step (default 2)")
    parser.add_argument("--lr", type=positive_float, default=0.5, help="SGD learning rate (default 0.5)")
    parser.add_argument("--seed", type=int, default=123, help="random seed, the same on every process (default 123)")
    parser.add_argument("--out", type=path_argument, default=None, help="folder for rank<k>.json results")
    args = parser.parse_args(argv)
    return run(lambda: train_ddp(args), argv)


def train_ddp(args) -> None:
    """Join the process group, train with DDP, report (and write rank<k>.json), leave the group."""
    if args.out is not None:
        check_output_dir(args.out, option="--out")  # before joining the group: a bad folder fails alone
    rank, world_size, device, backend = ddp_setup()
    try:
        # Same seed everywhere; DDP would broadcast rank 0's initial weights anyway.
        set_seed(args.seed)
        X_train, y_train, X_test, y_test = make_toy_data()
        train_ds, test_ds = ToyDataset(X_train, y_train), ToyDataset(X_test, y_test)

        # The sampler hands each rank a disjoint shard (padded by repeating examples so all
        # shards are equal); it shuffles itself, so the DataLoader must not (shuffle=False).
        sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=args.seed)
        train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=False, sampler=sampler,
                                  drop_last=True, pin_memory=device.type == "cuda")

        model = NeuralNetwork(num_inputs=2, num_outputs=2).to(device)
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr)

        for epoch in range(args.num_epochs):
            sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
            ddp_model.train()
            for features, labels in train_loader:
                features, labels = features.to(device), labels.to(device)
                loss = F.cross_entropy(ddp_model(features), labels)
                optimizer.zero_grad()
                loss.backward()  # DDP all-reduces (averages) the gradients here
                optimizer.step()
                log(f"[rank {rank}] epoch {epoch + 1:03d}/{args.num_epochs:03d} | "
                    f"batch size {labels.shape[0]} | train loss {loss.item():.4f}")

        # Every rank evaluates the full sets with the unwrapped model (no sampler needed).
        full_train = DataLoader(train_ds, batch_size=args.batch_size)
        full_test = DataLoader(test_ds, batch_size=args.batch_size)
        train_acc = compute_accuracy(model, full_train, device)
        test_acc = compute_accuracy(model, full_test, device)
        digest, total = weights_fingerprint(model)
        log(f"[rank {rank}/{world_size}, {backend}, {device}] train accuracy {train_acc:.2f} | "
            f"test accuracy {test_acc:.2f} | weights sha256 {digest[:16]} sum {total:.6f}")

        if args.out is not None:
            result = {"rank": rank, "world_size": world_size, "backend": backend, "device": str(device),
                      "train_acc": train_acc, "test_acc": test_acc, "weights_sha256": digest,
                      "weights_sum": total, "weights": flat_weights(model).tolist()}
            with atomic_write(args.out / f"rank{rank}.json") as f:  # a reader never sees half a file
                json.dump(result, f)
        # Wait for every rank before tearing the group down: a rank that exits while another
        # is still talking to it can abort Gloo's threads ("terminate called ...").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
