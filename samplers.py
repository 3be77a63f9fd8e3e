"""Distributed samplers: repeated augmentation for training, exact (unpadded) sharding for evaluation."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["RASampler", "DistributedEvalSampler"]


def _world(num_replicas: Optional[int], rank: Optional[int]) -> tuple[int, int]:
    """Fill in (num_replicas, rank) from torch.distributed when it is initialised, else (1, 0)."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return int(num_replicas), int(rank)


class RASampler(Sampler[int]):
    """Repeated-augmentation sampler (Hoffer et al. 2020; used by DeiT): each chosen image is seen
    ``num_repeats`` (R) times in the same step, each time with its own random augmentation.

    What it yields, for N = len(dataset), W = num_replicas, R = num_repeats:

    - every rank yields exactly ``L = ceil(N / W)`` indices per epoch (the length of an ordinary
      distributed epoch), so all ranks run the same number of iterations, for any N >= 1 and any W;
    - an epoch uses ``U = ceil(L * W / R)`` distinct images, each written R times in a row into a
      stream of length L * W; rank r takes stream positions r, r + W, r + 2W, ...;
    - the R copies of an image occupy R consecutive stream positions, hence R different ranks at the
      same or the next local position when R <= W; with W < R (e.g. one process) copies share a rank
      and sit next to each other in its batches;
    - coverage: epochs are grouped in cycles of R (epochs cR .. cR+R-1); a cycle draws one permutation
      (seed, c) and its R epochs take consecutive windows of U images from it (wrapping around), so
      every image is used at least once per cycle (R * U >= N). Without shuffle the permutation is the
      identity. Unlike independent random subsets per epoch, no image is left out for many epochs;
    - tiny data sets (U > N): the N images, R copies each, are cycled until the L * W slots are filled;
    - the output depends only on (seed, epoch, N, W, R, rank): every rank computes the same stream.

    Call ``set_epoch(epoch)`` before each epoch.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, num_repeats: int = 3, seed: int = 0) -> None:
        self.num_replicas, self.rank = _world(num_replicas, rank)
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.dataset = dataset
        self.shuffle = shuffle
        self.num_repeats = int(num_repeats)
        self.seed = int(seed)
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) / self.num_replicas)  # L, per rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if n == 0:
            return iter([])
        total = self.num_samples * self.num_replicas
        cycle, turn = divmod(self.epoch, self.num_repeats)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + cycle)  # distinct (seed, cycle) pairs give distinct streams
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        used = math.ceil(total / self.num_repeats)
        if used >= n:
            picked = order
        else:  # this epoch's window of the cycle's permutation
            picked = order[(turn * used + torch.arange(used)) % n]
        stream = picked.repeat_interleave(self.num_repeats)
        if stream.numel() < total:  # tiny data set: cycle the stream so every rank gets L indices
            stream = stream.repeat(math.ceil(total / stream.numel()))
        mine = stream[self.rank:total:self.num_replicas]
        return iter(mine.tolist())


class DistributedEvalSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r yields r, r + W, r + 2W, ... (< N), in order.

    Over all ranks every index appears exactly once, so metrics summed over ranks are exact; lengths
    differ by at most one (ranks r < N mod W get one more), and a rank may get none when N < W, so the
    evaluation loop must not run per-batch collectives and must reduce sums and counts at the end.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.dataset = dataset
        n = len(dataset)
        self.num_samples = len(range(self.rank, n, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """No-op (the order never changes); present so callers can treat all samplers alike."""

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))
