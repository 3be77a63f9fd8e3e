"""One status line every few iterations of a loop: position, rates, running means and memory.

    progress = Progress("train epoch 3", total=len(loader), every=10, device=device)
    for batch in loader:
        ...
        progress.step(images=batch_images, loss=loss_fn)   # loss_fn read only on printed steps
    progress.close()
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Callable, Dict, Union

import torch
from timm.utils import AverageMeter

Value = Union[float, Callable[[], float]]


def peak_memory_mib(device: torch.device) -> float:
    """CUDA allocator peak on a GPU; the process' peak resident set on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts iterations and images; on every ``every``-th step (and the last) prints one line with the
    values passed to :meth:`step`. Values may be callables, evaluated only when a line is printed, so a
    device-side number costs a host read once per line, not once per step."""

    def __init__(self, title: str, total: int, every: int, device: torch.device) -> None:
        self.title = title
        self.total = max(int(total), 0)
        self.every = max(int(every), 1)
        self.device = device
        self.done = 0
        self.images = 0
        self.means: Dict[str, AverageMeter] = {}
        self._started = self._last_time = time.perf_counter()
        self._last_images = 0

    def step(self, images: int = 0, **values: Value) -> None:
        self.done += 1
        self.images += int(images)
        if self.done % self.every and self.done != self.total:
            return
        now = time.perf_counter()
        rate = (self.images - self._last_images) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_images = now, self.images
        shown = []
        for name, value in values.items():
            value = float(value() if callable(value) else value)
            meter = self.means.setdefault(name, AverageMeter())
            meter.update(value)
            shown.append(f"{name} {value:.4g} (mean {meter.avg:.4g})")
        elapsed = now - self._started
        remaining = elapsed / self.done * (self.total - self.done)
        width = len(str(self.total))
        print(" | ".join([f"{self.title} | {self.done:>{width}}/{self.total}", *shown])
              + f" | {rate:.1f} img/s | eta {_clock(remaining)} | peak mem {peak_memory_mib(self.device):.0f} MiB",
              flush=True)

    def close(self) -> float:
        """Print the loop's total time; returns it in seconds."""
        elapsed = time.perf_counter() - self._started
        print(f"{self.title} | finished {self.done} iterations in {_clock(elapsed)} "
              f"({elapsed / max(self.done, 1):.3f} s each)", flush=True)
        return elapsed
