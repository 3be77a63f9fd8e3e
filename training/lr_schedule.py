"""Learning-rate schedules stepped after every optimizer update (``--sched-on-updates``).

``--sched cosine`` becomes the per-iteration cosine of EfficientTrain / BEiT / ConvNeXt (their
``cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs, start_warmup_value)``), which
Table 4's runs used: with W = warmup_epochs x niter_per_ep warm-up updates and T = epochs x niter_per_ep in all,
update t trains at

    t < W:       start + (base - start) * t / (W - 1)           (a linspace that reaches base at t = W - 1)
    W <= t < T:  final + (base - final) * (1 + cos(pi * (t - W) / (T - W))) / 2

and at ``final`` past T. timm's own per-update cosine differs in the warm-up (it reaches base one update later)
and, without warm-up prefix, in the cosine's span. Every other ``--sched`` is timm's scheduler with
``step_on_epochs=False`` (builders.build_scheduler).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
from timm.scheduler.scheduler import Scheduler



def warmup_cosine_value(t: int, base: float, final: float, warmup_updates: int, total_updates: int,
                        start: float) -> float:
    """The lr of update ``t`` (0-based, over the whole run) for the schedule in the module docstring."""
    if t < warmup_updates:
        if warmup_updates == 1:
            return start
        return start + (base - start) * t / (warmup_updates - 1)
    if t >= total_updates:
        return final
    span = total_updates - warmup_updates
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * (t - warmup_updates) / span))


class WarmupCosineUpdates(Scheduler):
    """timm Scheduler (``step_update(num_updates)``, ``state_dict``) for :func:`warmup_cosine_value`. Each param
    group's base is its lr at construction (the scaled --lr)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_updates: int, warmup_updates: int, warmup_lr: float,
                 min_lr: float, noise_range_t: Optional[List[int]] = None, noise_pct: float = 0.67,
                 noise_std: float = 1.0, noise_seed: int = 42) -> None:
        super().__init__(optimizer, "lr", t_in_epochs=False, noise_range_t=noise_range_t, noise_pct=noise_pct,
                         noise_std=noise_std, noise_seed=noise_seed)
        self.total_updates, self.warmup_updates = int(total_updates), int(warmup_updates)
        self.warmup_lr, self.min_lr = float(warmup_lr), float(min_lr)
        self.update_groups(self._get_lr(0))  # the first update trains at the schedule's first value

    def _get_lr(self, t: int) -> List[float]:
        return [warmup_cosine_value(t, base, self.min_lr, self.warmup_updates, self.total_updates, self.warmup_lr)
                for base in self.base_values]


def build_update_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any, epochs: int, updates_per_epoch: int,
                           seed: int) -> Scheduler:
    """``--sched cosine --sched-on-updates``: :class:`WarmupCosineUpdates`, stepped by the caller with
    ``step_update(global update index)``; ``--lr-noise`` points are fractions of the run or epochs, as in timm."""
    total = epochs * updates_per_epoch
    noise = optim_cfg.lr_noise
    noise_range = None
    if noise is not None:
        points = noise if isinstance(noise, (list, tuple)) else [noise]
        noise_range = [int(p * total) if p < 1 else int(p * updates_per_epoch) for p in points]
        noise_range = noise_range[0] if len(noise_range) == 1 else noise_range
    return WarmupCosineUpdates(optimizer, total, optim_cfg.warmup_epochs * updates_per_epoch, optim_cfg.warmup_lr,
                               optim_cfg.min_lr, noise_range, optim_cfg.lr_noise_pct, optim_cfg.lr_noise_std, seed)
