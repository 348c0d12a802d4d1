"""Running the chapter-5 trainer on several processes under `torchrun`: data-parallel (DDP) or sharded (FSDP).

    torchrun --nproc_per_node=2 -m ch05.gpt_train --quick           # DistributedDataParallel
    torchrun --nproc_per_node=2 -m ch05.gpt_train --quick --fsdp    # fully sharded (FSDP2)

Each process trains on its own shard of every epoch's batches (DistributedSampler). The backend
is picked automatically (NCCL on CUDA, Gloo on CPU/Windows).

* DDP keeps a whole copy of the model and the optimizer state on every process and averages the
  gradients, so all ranks keep identical weights; `--batch-size` is per process.
* FSDP (`--fsdp`, PyTorch's `fully_shard`, "FSDP2") is for a model that does not fit one device:
  each process keeps only its 1/N slice of every weight, gradient and AdamW moment. Before a
  transformer block runs, its weights are gathered from all processes and freed again after it,
  so the peak is one block's full weights plus the slices (`shard_model`). The gradients are
  averaged and scattered back as slices: the same update as DDP. `--batch-size` is the global
  batch, split across the processes (it must be divisible by their number), so a run keeps its
  batches when it is resumed on another number of processes. Checkpoints are a folder,
  `checkpoint.dcp`, written by all processes together with `torch.distributed.checkpoint`
  (one file of slices per process, plus `train_state.pth` with the step, RNG states and sampler
  position); DCP re-slices them on loading, so a run saved with 2 processes resumes with 1 or 2
  (or any number that divides the global batch) and trains on as if uninterrupted. Ctrl-C (or
  SIGTERM) on any process stops every process after the same step, and they write the checkpoint.
  At the end the full weights are gathered once into the first process and written as the usual
  single-file `model.pth` that `python -m ch05.gpt_generate --model .../model.pth` loads.

Several machines (each runs the same command; `--nproc_per_node` processes per machine, one per
GPU; the output folder must be on a file system all machines share, since every process writes
its slice of the checkpoint there):

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-id=run1 --rdzv-backend=c10d \
             --rdzv-endpoint=HOST_OF_THE_FIRST_MACHINE:29500 \
             -m ch05.gpt_train --fsdp --output-dir /shared/run1

Resuming, on any number of processes: add `--resume /shared/run1/checkpoint.dcp` to the same command.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from llmfs.atomic import atomic_path
from llmfs.checkpoint import CheckpointFileError, CheckpointMismatchError, load_state_file
from llmfs.runtime import distributed_backend


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# New: FSDP also runs on a single process under torchrun (to resume a sharded checkpoint on one machine).
def under_torchrun() -> bool:
    """Started by torchrun (one process or several): the variables `init_process_group` reads are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed() -> DistInfo:
    """Join the process group that torchrun set up through environment variables."""
    backend = distributed_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def shard_loader(loader: DataLoader, info: DistInfo, seed: int, batch_size: int | None = None) -> DataLoader:
    """The same data, split across ranks: each rank sees len(dataset) / world_size samples per epoch.

    The shuffle order does not depend on the number of ranks (rank r takes every world_size-th sample
    of one permutation), so `batch_size` per rank = global batch / world_size gives every step the
    same global batch on any number of ranks (FSDP's resume on another number of processes needs that).
    """
    sampler = DistributedSampler(loader.dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=batch_size or loader.batch_size, sampler=sampler,
                      drop_last=loader.drop_last, num_workers=loader.num_workers)


# --- Fully sharded data parallel (FSDP2) --------------------------------------------------------------

def shard_model(model: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
    """Shard `model` in place with FSDP2's `fully_shard`: each of `blocks` (the transformer blocks) is
    one unit whose weights are gathered just before it runs and freed after; the root unit holds the
    rest (embeddings, final norm, output head). Returns the same object, now also an `FSDPModule`.

    Its parameters become DTensors holding this rank's slice; the model's forward is a collective
    (every rank must run it, with inputs of the same shapes).
    """
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded with `fully_shard` (so saving and loading it are collectives)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 ({} on the others); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def cleanup() -> None:
    """Leave the process group once every rank got here (an early exit can abort Gloo's threads)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --- Sharded checkpoints (FSDP): a folder written by all processes together --------------------------

# New: FSDP keeps a slice of every tensor on each process; torch.distributed.checkpoint (DCP) writes the
# slices in parallel and re-slices them on loading, for any number of processes.
SHARDED_STATE_FILE = "train_state.pth"  # step, RNG states, history: plain values, read with weights_only


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A folder written by `save_sharded_checkpoint` (DCP's `.metadata` and our training state)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / SHARDED_STATE_FILE).is_file()


def save_sharded_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                            **training_state) -> Path:
    """Model + optimizer slices of every process, and the training state, as the folder `path`; a collective.

    Written into `.<name>.tmp` beside it, then renamed into place by rank 0 once every process has
    written its slice, so a run killed while saving leaves the previous checkpoint as it was (the
    old folder is renamed to `.<name>.old` for the moment between the two renames).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    main = dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if main:
        with atomic_path(tmp / SHARDED_STATE_FILE) as file:
            torch.save(training_state, file)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        fd = os.open(path.parent, os.O_RDONLY)  # the renames themselves reach the disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def read_sharded_training_state(path: str | os.PathLike) -> dict:
    """The training state (step, RNG states, history, settings) of a sharded checkpoint folder."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointFileError(f"{path} is not a sharded checkpoint folder (it lacks .metadata or "
                                  f"{SHARDED_STATE_FILE}); give the checkpoint.dcp folder an --fsdp run wrote")
    return load_state_file(path / SHARDED_STATE_FILE)


def load_sharded_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer into the sharded `model`/`optimizer`; a collective.

    The folder may have been written by another number of processes: DCP reads, for each
    process, the parts of the saved slices that make up its own slices now.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=Path(path))
    except dcp.CheckpointException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointMismatchError(f"{path} does not fit the model and optimizer ({first})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
