"""Running the chapter-5 trainer data-parallel under `torchrun` (DistributedDataParallel).

    torchrun --nproc_per_node=2 -m ch05.gpt_train --quick

Each process trains on its own shard of every epoch's batches (DistributedSampler);
DDP averages the gradients, so all ranks keep identical weights. The backend is
picked automatically (NCCL on CUDA, Gloo on CPU/Windows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

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


def shard_loader(loader: DataLoader, info: DistInfo, seed: int) -> DataLoader:
    """The same data, split across ranks: each rank sees len(dataset) / world_size samples per epoch."""
    sampler = DistributedSampler(loader.dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                      num_workers=loader.num_workers)


def cleanup() -> None:
    """Leave the process group once every rank got here (an early exit can abort Gloo's threads)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
