"""Losses with the criterion(samples, outputs, targets) interface used by engine.train_one_epoch.

`samples` [B, 3, H, W] are passed so a loss can run a teacher on the same inputs (distillation) or use
extra per-token targets (LV-ViT token labeling plugs in with the same call).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class DistillationLoss(nn.Module):
    """DeiT's knowledge distillation loss (Touvron et al. 2021), also the plain loss when type is 'none'.

    outputs: logits [B, K], or (cls_logits [B, K], dist_logits [B, K]) from a distilled model in training.
    targets: class indices [B] or soft/mixed targets [B, K] (whatever `base_criterion` accepts).
    soft: alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 (summed, divided by the number of logits)
          + (1 - alpha) * base.
    hard: alpha * CE(dist_logits, argmax teacher) + (1 - alpha) * base.
    The distillation term uses the distillation-token logits when the model has them, else the class logits.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float) -> None:
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(f"distillation_type must be none|soft|hard, got {distillation_type!r}")
        if distillation_type != "none" and teacher_model is None:
            raise ValueError("a teacher model is required for soft or hard distillation")
        self.base_criterion = base_criterion
        # Keep the teacher out of this module's parameters/state_dict: it is frozen and not checkpointed.
        self.__dict__["teacher_model"] = teacher_model
        self.distillation_type = distillation_type
        self.alpha = float(alpha)
        self.tau = float(tau)

    def forward(self, samples: torch.Tensor, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, targets)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            outputs_kd = outputs  # a student without a distillation token distills through its class token

        teacher = self.__dict__["teacher_model"]
        with torch.no_grad():
            teacher_outputs = teacher(samples)
            if not isinstance(teacher_outputs, torch.Tensor):
                teacher_outputs = teacher_outputs[0]

        if self.distillation_type == "soft":
            T = self.tau
            # KL in log space for stability; fp32 so bf16/fp16 autocast does not lose the small terms
            s = F.log_softmax(outputs_kd.float() / T, dim=1)
            t = F.log_softmax(teacher_outputs.float() / T, dim=1)
            distillation_loss = F.kl_div(s, t, reduction="sum", log_target=True) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))

        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def build_base_criterion(*, mixup_active: bool, smoothing: float, bce_loss: bool,
                         bce_target_thresh: Optional[float] = None) -> nn.Module:
    """The classification loss on (logits [B, K], targets).

    With mixup/cutmix the targets are already soft (label smoothing is folded in by timm's Mixup).
    """
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if bce_loss:
        # timm's BCE takes class indices or dense targets, and smooths only when targets are indices
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else smoothing, target_threshold=bce_target_thresh)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()
