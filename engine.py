"""One training epoch and one evaluation pass. Plain objects in, a dict of numbers out: no argparse here.

The step never waits for the device on its own: losses are accumulated on the device, and the host reads
them (and checks they are finite) only every ``print_freq`` iterations and at the end of the epoch.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import distributed
from runtime.progress import Progress


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss. ``epoch`` is 0-based, ``iteration`` 1-based within the epoch."""

    def __init__(self, epoch: int, iteration: int, total: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at epoch {epoch}, iteration {iteration}/{total}")
        self.epoch, self.iteration, self.total, self.value = epoch, iteration, total, value


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.autocast in ``amp_dtype``, or nothing for full precision."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples/lists, e.g. token labeling's (class, label map)) copied to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(o, device) for o in obj)
    return obj


class _LossWatch:
    """Per-iteration losses kept on the device; :meth:`check` reads them once (summed over ranks), raises on
    the first non-finite one, and adds them to the epoch total."""

    def __init__(self, epoch: int, total: int, device: torch.device) -> None:
        self.epoch, self.total, self.device = epoch, total, device
        self.pending: List[torch.Tensor] = []
        self.first_pending = 1
        self.sum = 0.0
        self.count = 0
        self.last_mean = float("nan")

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().float().reshape(()))

    def check(self) -> None:
        if not self.pending:
            return
        losses = torch.stack(self.pending)
        if distributed.active():
            # every rank sees the same sums, so a NaN on any rank stops all of them at the same iteration
            torch.distributed.all_reduce(losses)
            losses = losses / distributed.world_size()
        values = losses.tolist()
        for offset, value in enumerate(values):
            if value != value or value in (float("inf"), float("-inf")):
                raise NonFiniteLossError(self.epoch, self.first_pending + offset, self.total, value)
        self.sum += sum(values)
        self.count += len(values)
        self.last_mean = sum(values) / len(values)
        self.first_pending += len(values)
        self.pending.clear()


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                    max_norm: Optional[float]) -> None:
    if max_norm:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model: nn.Module, criterion: Callable[[torch.Tensor, Any, Any], torch.Tensor],
                    data_loader: Iterable, optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    *, amp_dtype: Optional[torch.dtype] = None, scaler: Optional[torch.amp.GradScaler] = None,
                    max_norm: Optional[float] = None, model_ema: Optional[Any] = None,
                    mixup_fn: Optional[Callable] = None, grad_accum_steps: int = 1,
                    set_training_mode: bool = True, print_freq: int = 10,
                    ema_source: Optional[nn.Module] = None,
                    downsample: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    on_update: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """One pass over ``data_loader`` of (samples [B, 3, H, W], targets). ``criterion(samples, outputs,
    targets)`` returns the scalar loss; targets may be a tuple the criterion understands.

    Micro-batches form accumulation groups of ``grad_accum_steps``; each loss is divided by its group's size,
    so a group's gradient is the mean over its samples, and the optimizer and the EMA (updated from
    ``ema_source``, default ``model``) step once per group, the last, shorter group included. Under DDP
    gradients are all-reduced on the stepping micro-batch only.
    Returns {'loss', 'lr', 'img_per_s', 'epoch_time', 'images', 'optimizer_steps'}; the loss is the mean over
    iterations and ranks. Raises NonFiniteLossError on every rank together.
    ``downsample`` maps each batch on the device before mixup (a curriculum's frequency crop);
    ``on_update(n)`` runs after the epoch's n-th optimizer update (a per-update lr schedule).
    """
    model.train(set_training_mode)
    accum = max(int(grad_accum_steps), 1)
    total = len(data_loader)  # type: ignore[arg-type]
    world = distributed.world_size()
    can_defer_sync = distributed.active() and hasattr(model, "no_sync")
    watch = _LossWatch(epoch, total, device)
    progress = Progress(f"train epoch {epoch}", total, print_freq, device)
    optimizer.zero_grad(set_to_none=True)
    images = steps = 0
    start = time.perf_counter()
    for it, (samples, targets) in enumerate(data_loader):
        samples = samples.to(device, non_blocking=True)
        targets = move_to(targets, device)
        if downsample is not None:
            samples = downsample(samples)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        group_start = it - it % accum
        group_size = min(accum, total - group_start)
        steps_now = it + 1 == group_start + group_size
        with model.no_sync() if can_defer_sync and not steps_now else contextlib.nullcontext():
            with autocast_context(device, amp_dtype):
                loss = criterion(samples, model(samples), targets)
            watch.add(loss)
            scaled = loss / group_size
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if steps_now:
            _optimizer_step(optimizer, scaler, max_norm)
            steps += 1
            if on_update is not None:
                on_update(steps)
            if model_ema is not None:
                model_ema.update(ema_source if ema_source is not None else model)
        images += samples.shape[0] * world
        if (it + 1) % max(int(print_freq), 1) == 0 or it + 1 == total:
            watch.check()
        progress.step(images=samples.shape[0] * world, loss=lambda: watch.last_mean,
                      lr=optimizer.param_groups[0]["lr"])
    watch.check()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the epoch's time includes its queued kernels
    epoch_time = time.perf_counter() - start
    progress.close()
    return {"loss": watch.sum / max(watch.count, 1), "lr": float(optimizer.param_groups[0]["lr"]),
            "img_per_s": images / max(epoch_time, 1e-9), "epoch_time": epoch_time, "images": images,
            "optimizer_steps": steps}


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, *, reduce_across_ranks: bool = False,
             header: str = "eval", print_freq: int = 50, dynamic_batch: bool = False) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over every sample of ``data_loader``.

    ``dynamic_batch`` (for a compiled model) marks the batch dimension dynamic, so the smaller last batch
    reuses the evaluation graph instead of compiling another one (unless it holds a single image: dynamo
    specialises size 1).

    Counts stay on the device until the end (one host read). With ``reduce_across_ranks`` (an exact,
    non-padded distributed sampler) they are summed over ranks, so the result equals one process'.
    Returns {'acc1', 'acc5', 'loss', 'n'}.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, samples
    progress = Progress(header, len(data_loader), print_freq, device)  # type: ignore[arg-type]
    for images, target in data_loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if dynamic_batch:
            torch._dynamo.maybe_mark_dynamic(images, 0)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        if not isinstance(logits, torch.Tensor):  # a distilled model left in distilled-training mode
            logits = (logits[0] + logits[1]) / 2
        logits = logits.float()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target[:, None])
        totals += torch.stack([best[:, 0].sum(), best.any(dim=1).sum(),
                               F.cross_entropy(logits, target, reduction="sum"),
                               torch.tensor(images.shape[0], device=device)]).double()
        progress.step(images=images.shape[0])
    progress.close()
    hits1, hits5, loss_sum, count = (distributed.sum_across_ranks(totals.tolist(), device) if reduce_across_ranks
                                     else totals.tolist())
    n = int(round(count))
    result = {"acc1": 100.0 * hits1 / max(n, 1), "acc5": 100.0 * hits5 / max(n, 1), "loss": loss_sum / max(n, 1),
              "n": n}
    print(f"{header}: top-1 {result['acc1']:.3f}% | top-5 {result['acc5']:.3f}% | loss {result['loss']:.4f} "
          f"| {n} images", flush=True)
    return result


@torch.no_grad()
def measure_throughput(model: nn.Module, device: torch.device, batch_size: int, img_size: int,
                       amp_dtype: Optional[torch.dtype] = None, train: bool = False,
                       warmup: int = 3, iters: int = 10) -> float:
    """Images/s of the forward pass (``train=True``: forward + backward in training mode, ToE active at
    its current stage) on random [batch_size, 3, img_size, img_size] inputs."""
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    model.train(train)

    def once() -> None:
        with torch.enable_grad() if train else contextlib.nullcontext():
            with autocast_context(device, amp_dtype):
                out = model(x)
            if train:
                out = out if isinstance(out, torch.Tensor) else out[0]
                out.float().sum().backward()
                model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch_size * iters / max(time.perf_counter() - start, 1e-9)
