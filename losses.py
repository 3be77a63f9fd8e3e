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


def split_logits(outputs: Outputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(class logits, logits to distill): a distilled model's two heads, or the class head twice."""
    if isinstance(outputs, torch.Tensor):
        return outputs, outputs
    class_logits, dist_logits = outputs
    return class_logits, dist_logits


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), summed and divided by the number of
    logits (DeiT's normalisation). Computed in fp32 log space so autocast does not flush small terms."""
    log_p_student = F.log_softmax(student.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return kl * (tau ** 2) / student.numel()


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax class (tau unused)."""
    return F.cross_entropy(student, teacher.argmax(dim=-1))


_DISTILLATION_TERMS = {"soft": soft_distillation, "hard": hard_distillation}


class DistillationLoss(nn.Module):
    """Classification loss, optionally blended with a distillation term (Touvron et al. 2021):

        (1 - alpha) * base(class_logits, targets) + alpha * term(dist_logits, teacher(samples))

    ``outputs`` are logits [B, K], or (class [B, K], distillation-token [B, K]) logits of a distilled model in
    training; a model without a distillation token distills through its class logits. ``term`` is
    :func:`soft_distillation` or :func:`hard_distillation`; with type 'none' the loss is ``base`` alone.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float) -> None:
        super().__init__()
        if distillation_type != "none" and distillation_type not in _DISTILLATION_TERMS:
            raise ValueError(f"distillation_type must be none|soft|hard, got {distillation_type!r}")
        if distillation_type != "none" and teacher_model is None:
            raise ValueError("a teacher model is required for soft or hard distillation")
        self.base_criterion = base_criterion
        self.distillation_type = distillation_type
        self.alpha = float(alpha)
        self.tau = float(tau)
        # a frozen teacher is not part of this module's parameters or state_dict
        self._teacher = (teacher_model,)

    @torch.no_grad()
    def teacher_logits(self, samples: torch.Tensor) -> torch.Tensor:
        out = self._teacher[0](samples)
        return out if isinstance(out, torch.Tensor) else out[0]

    def forward(self, samples: torch.Tensor, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        class_logits, dist_logits = split_logits(outputs)
        supervised = self.base_criterion(class_logits, targets)
        if self.distillation_type == "none":
            return supervised
        term = _DISTILLATION_TERMS[self.distillation_type](dist_logits, self.teacher_logits(samples), self.tau)
        return (1.0 - self.alpha) * supervised + self.alpha * term


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
