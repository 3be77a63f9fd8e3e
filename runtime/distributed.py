"""Process-group set-up from the launcher's environment (torchrun or SLURM), and the few collectives the
training loop needs. A run without a launcher is a world of one and never touches torch.distributed."""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from runtime.errors import UsageError


@dataclass(frozen=True)
class Placement:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_first_host(nodelist: str) -> str:
    """'gpu[001-004,007],cpu01' -> 'gpu001': the rendezvous host of a SLURM allocation."""
    first = nodelist.split(",")[0]
    if "[" not in first:
        return first
    stem, ranges = first.split("[", 1)
    return stem + ranges.split("-")[0].split(",")[0].rstrip("]")


def launcher_placement(legacy_local_rank: Optional[int] = None) -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) announced by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or by a SLURM
    job step with several tasks; (0, 1, 0) without a launcher. ``legacy_local_rank`` is the
    ``--local_rank`` argument that torch.distributed.launch passes instead of LOCAL_RANK."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = env.get("LOCAL_RANK")
        local_rank = int(local) if local is not None else int(legacy_local_rank or 0)
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank
    tasks = int(env.get("SLURM_NTASKS", "1"))
    if "SLURM_PROCID" in env and tasks > 1:
        rank = int(env["SLURM_PROCID"])
        local_rank = int(env.get("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1)))
        # env:// rendezvous needs these; run_with_submitit sets them, a bare srun does not
        env.setdefault("MASTER_PORT", "29500")
        env.setdefault("MASTER_ADDR", _slurm_first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST",
                                                                                             "127.0.0.1"))))
        env.update(RANK=str(rank), WORLD_SIZE=str(tasks), LOCAL_RANK=str(local_rank))
        return rank, tasks, local_rank
    return 0, 1, int(legacy_local_rank or 0)


def check_world_size(requested: Optional[int], legacy_local_rank: Optional[int] = None) -> None:
    """--world_size is only a consistency check: the launcher decides the world size."""
    if requested is None:
        return
    _, world, _ = launcher_placement(legacy_local_rank)
    if requested != world:
        how = "launch with torchrun or SLURM" if world == 1 else "it is set by the launcher"
        raise UsageError(f"--world_size {requested} disagrees with the launcher's world size {world} ({how})")


def start(use_cuda: bool, init_method: str, legacy_local_rank: Optional[int] = None) -> Placement:
    """Join the process group the launcher announced (nccl on CUDA, gloo on CPU); silence stdout on
    every rank but 0 so logs are printed once."""
    rank, world, local_rank = launcher_placement(legacy_local_rank)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if world <= 1 and not launched:
        return Placement(0, 1, local_rank, "none")
    # a launcher's world of one still joins a group, so `torchrun --nproc_per_node 1` tests the backend
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world, rank=rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    sys.stderr.write(f"rank {rank}/{world} joined ({backend}, {init_method})\n")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return Placement(rank, world, local_rank, backend)


def stop() -> None:
    if active():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def sum_across_ranks(values: List[float], device: torch.device) -> List[float]:
    """Element-wise sum of a few scalars over ranks, in float64 so counts stay exact."""
    if not active():
        return [float(v) for v in values]
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def share_from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object); the value itself without a process group."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
