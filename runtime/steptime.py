"""Training-step timing shared by ``benchmarks/bench_toe.py`` and the quickstart's report.

Several configurations (e.g. the full-token baseline and each ToE stage) are timed in one process,
interleaved: every round runs each configuration once, and the starting configuration rotates from round
to round, so that load drifting on a shared machine spreads over all of them instead of biasing one. The
``cpu`` clock (``time.process_time``: this process's CPU time over all its threads) hardly changes with
other jobs on the machine when torch uses one thread; ``wall`` is the elapsed time, with CUDA synchronised.

    steps = {"baseline": make_step(model, images, labels), "toe": make_step(patched, images, labels)}
    warm_up(steps, rounds=1)
    times = time_interleaved(steps, reps=5, clock=CLOCKS["cpu"])   # {name: [seconds, ...]}
    med = medians(times)
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

Clock = Callable[[], float]
Step = Callable[[], object]

CLOCKS: Dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Step, device: Optional[torch.device] = None, clock: Clock = time.perf_counter) -> float:
    """Seconds ``clock`` advances during one call of ``fn`` (queued CUDA work on ``device`` included)."""
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def make_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
              optimizer: Optional[torch.optim.Optimizer] = None,
              amp_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One training iteration on a fixed batch (images [B, C, H, W], labels [B]): forward, cross-entropy,
    backward, optimizer step. ``optimizer`` defaults to AdamW with DeiT's settings (values do not change
    the speed); ``amp_dtype`` runs the forward under autocast, float16 on CUDA with a GradScaler."""
    if optimizer is None:
        from timm.optim import create_optimizer_v2

        import toe

        # built on the module under a torch.compile wrapper, whose parameters are the same tensors
        optimizer = create_optimizer_v2(toe.unwrap_model(model), "adamw", lr=5e-4, weight_decay=0.05)
    device_type = images.device.type
    use_scaler = amp_dtype == torch.float16 and device_type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step


def warm_up(steps: Mapping[str, Step], rounds: int = 1) -> None:
    """``rounds`` untimed calls of every step, in order (allocations, lazy initialisation, compilation)."""
    for _ in range(rounds):
        for fn in steps.values():
            fn()


def time_interleaved(steps: Mapping[str, Step], reps: int, *, settle: int = 1,
                     device: Optional[torch.device] = None, clock: Clock = time.perf_counter,
                     on_round: Optional[Callable[[int, Dict[str, List[float]]], None]] = None
                     ) -> Dict[str, List[float]]:
    """``reps`` rounds; round r times each configuration once, starting with configuration r mod len(steps).
    ``settle`` untimed calls of a configuration come right before each of its timed calls, so that every
    timed step follows a step of its own shapes, as in training (the CPU allocator's state differs
    otherwise). ``on_round(r, times)`` is called after each round. Returns {name: [seconds per rep]}."""
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(settle):
                steps[name]()
            times[name].append(timed(steps[name], device, clock))
        if on_round is not None:
            on_round(rep, times)
    return times


def medians(times: Mapping[str, List[float]]) -> Dict[str, float]:
    """The median of each configuration's times."""
    return {name: statistics.median(values) for name, values in times.items()}
