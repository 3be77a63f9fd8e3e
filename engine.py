"""train_one_epoch and evaluate. Plain arguments only: no argparse in here."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss. `epoch` is 0-based, `iteration` 1-based within the epoch."""

    def __init__(self, epoch: int, iteration: int, total: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at epoch {epoch}, iteration {iteration}/{total}")
        self.epoch = epoch
        self.iteration = iteration
        self.total = total
        self.value = value


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.autocast for bf16/fp16, or a no-op context for full precision."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj


def train_one_epoch(model: nn.Module, criterion: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor],
                    data_loader: Iterable, optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    *, amp_dtype: Optional[torch.dtype] = None, scaler: Optional[torch.amp.GradScaler] = None,
                    max_norm: Optional[float] = None, model_ema: Optional[Any] = None,
                    mixup_fn: Optional[Callable] = None, grad_accum_steps: int = 1,
                    set_training_mode: bool = True, print_freq: int = 10) -> Dict[str, float]:
    """One pass over `data_loader` of (samples [B, 3, H, W], targets): targets are class indices [B], or a
    tuple such as token labeling's (classes [B], label maps [B, 2, K, S, S]) that `criterion` understands.
    `criterion(samples, outputs, targets)` returns the scalar loss (DistillationLoss interface).

    The loss of each micro-batch is divided by the size of its accumulation group, so a group's gradient
    is the mean over its samples; the optimizer (and EMA) step once per group, the last group of the epoch
    included even when shorter. Under DDP, gradients are only all-reduced on the stepping micro-batch.
    Returns {'loss', 'lr', 'img_per_s', 'epoch_time', 'images', 'optimizer_steps'}: loss averaged
    over iterations and ranks, images counted over all ranks.
    Raises NonFiniteLossError (on every rank together) when a loss is NaN/inf.
    """
    model.train(set_training_mode)
    accum = max(int(grad_accum_steps), 1)
    total = len(data_loader)  # type: ignore[arg-type]
    logger = utils.ProgressLogger(f"Epoch: [{epoch}]", print_freq, device)
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    distributed = utils.is_dist_avail_and_initialized()
    world = utils.get_world_size()

    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    images = 0
    steps = 0
    start = time.time()
    for it, (samples, targets) in enumerate(logger.log_every(data_loader, lambda b: b[0].shape[0] * world)):
        samples = samples.to(device, non_blocking=True)
        targets = _to_device(targets, device)  # a tensor, or (class, label map) under token labeling
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        group_start = (it // accum) * accum
        group_size = min(accum, total - group_start)
        do_step = (it + 1 - group_start) == group_size

        sync_ctx = model.no_sync() if (distributed and not do_step and hasattr(model, "no_sync")) \
            else contextlib.nullcontext()
        with sync_ctx:
            with autocast_context(device, amp_dtype):
                outputs = model(samples)
                loss = criterion(samples, outputs, targets)
            loss_value = loss.detach().float()
            if distributed:
                # all ranks see the same (mean) value, so a NaN anywhere stops every rank at the same step
                loss_value = loss_value.clone()
                torch.distributed.all_reduce(loss_value)
                loss_value = loss_value / world
            loss_value = loss_value.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(epoch, it + 1, total, loss_value)
            scaled = loss / group_size
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()

        if do_step:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if scaler is not None:
                if max_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, max_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                if max_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if model_ema is not None:
                # fixed decay per optimizer step, as DeiT's EMA (no warm-up)
                model_ema.update(utils.unwrap_model(model))

        if device.type == "cuda":
            torch.cuda.synchronize()
        loss_sum += loss_value
        images += samples.shape[0] * world
        logger.update(loss=loss_value, lr=optimizer.param_groups[0]["lr"])

    epoch_time = time.time() - start
    return {
        "loss": loss_sum / max(total, 1),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "img_per_s": images / max(epoch_time, 1e-9),
        "epoch_time": epoch_time,
        "images": images,
        "optimizer_steps": steps,
    }


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, *, reduce_across_ranks: bool = False,
             header: str = "Test:", print_freq: int = 50) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over every sample of `data_loader`.

    With `reduce_across_ranks` (for --dist-eval with an exact, non-padded sampler) the correct counts,
    loss sums and sample counts are summed over ranks, so the result equals a single-process evaluation.
    Returns {'acc1', 'acc5', 'loss', 'n'}.
    """
    model.eval()
    logger = utils.ProgressLogger(header, print_freq, device)
    correct1 = correct5 = loss_sum = 0.0
    n = 0
    for images, target in logger.log_every(data_loader, lambda b: b[0].shape[0]):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            output = model(images)
        if not isinstance(output, torch.Tensor):  # distilled models in train mode; average like timm eval
            output = (output[0] + output[1]) / 2
        output = output.float()
        loss_sum += F.cross_entropy(output, target, reduction="sum").item()
        k = min(5, output.shape[1])
        topk = output.topk(k, dim=1).indices
        hits = topk.eq(target[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += images.shape[0]
    if reduce_across_ranks:
        correct1, correct5, loss_sum, n_f = utils.all_reduce_sum([correct1, correct5, loss_sum, float(n)], device)
        n = int(round(n_f))
    denom = max(n, 1)
    result = {"acc1": 100.0 * correct1 / denom, "acc5": 100.0 * correct5 / denom, "loss": loss_sum / denom, "n": n}
    print(f"* Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} loss {result['loss']:.4f} (n={n})")
    return result


@torch.no_grad()
def measure_throughput(model: nn.Module, device: torch.device, batch_size: int, img_size: int,
                       amp_dtype: Optional[torch.dtype] = None, train: bool = False,
                       warmup: int = 3, iters: int = 10) -> float:
    """Images/s of the forward pass on random [batch_size, 3, img_size, img_size] inputs.

    `train=True` measures forward+backward in training mode (ToE active at its current stage).
    """
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    model.train(train)

    def step() -> None:
        with torch.enable_grad() if train else contextlib.nullcontext():
            with autocast_context(device, amp_dtype):
                out = model(x)
            if train:
                out = out[0] if not isinstance(out, torch.Tensor) else out
                out.float().sum().backward()
                model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * iters / max(time.time() - t0, 1e-9)
