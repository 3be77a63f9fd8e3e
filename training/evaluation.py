"""Evaluation of the run's model (and its EMA) on the validation loader, and the --throughput timing."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

import engine


class Evaluator:
    """engine.evaluate over ``val_loader`` with the run's device and precision; ``running`` is true during a
    pass (for the stop line). ``reduce_across_ranks``: --dist-eval under several processes; ``dynamic_batch``:
    --compile (a smaller last batch reuses the graph)."""

    def __init__(self, val_loader: Any, device: torch.device, amp_dtype: Optional[torch.dtype],
                 reduce_across_ranks: bool, dynamic_batch: bool) -> None:
        self.val_loader, self.device, self.amp_dtype = val_loader, device, amp_dtype
        self.reduce, self.dynamic_batch = reduce_across_ranks, dynamic_batch
        self.running = False

    def __call__(self, model: torch.nn.Module, model_ema: Optional[Any], ema_device: torch.device,
                 epoch_label: str) -> Dict[str, Any]:
        """log.txt's test_* keys (and ema_test_acc1 with an EMA) for ``model`` after ``epoch_label``."""
        self.running = True
        stats = engine.evaluate(self.val_loader, model, self.device, self.amp_dtype,
                                reduce_across_ranks=self.reduce, header=f"eval {epoch_label}",
                                dynamic_batch=self.dynamic_batch)
        result = {"test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"],
                  "test_images": stats["n"]}
        if model_ema is not None:
            ema = engine.evaluate(self.val_loader, model_ema.module, ema_device, self.amp_dtype,
                                  reduce_across_ranks=self.reduce, header=f"eval EMA {epoch_label}")
            result["ema_test_acc1"] = ema["acc1"]
        self.running = False
        return result


def throughput(model: torch.nn.Module, device: torch.device, batch_size: int, size: int,
               amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
    """Images per second of ``model`` at ``size`` px: inference, then training steps."""
    forward = engine.measure_throughput(model, device, batch_size, size, amp_dtype)
    train = engine.measure_throughput(model, device, batch_size, size, amp_dtype, train=True)
    return {"eval_img_per_s": forward, "train_img_per_s": train}
