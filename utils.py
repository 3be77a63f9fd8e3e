"""Seeding: every epoch's randomness is a function of (seed, rank, epoch) only, so a resumed run draws
exactly what an uninterrupted one would."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every CUDA device)."""
    seed = int(seed) % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(base_seed: int, rank: int, epoch: int) -> int:
    """A 32-bit seed derived from (seed, rank, epoch) alone, independent of what ran before."""
    return int(np.random.SeedSequence([int(base_seed) % 2 ** 32, int(rank), int(epoch)]).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: torch seeds ``random`` and torch in each worker, but not numpy."""
    np.random.seed(torch.initial_seed() % 2 ** 32)


def plain(value: Any) -> Any:
    """A value reduced to JSON/weights_only-safe python types (tuples become lists, objects strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def plain_dict(values: Dict[str, Any]) -> Dict[str, Any]:
    return {str(k): plain(v) for k, v in values.items()}
