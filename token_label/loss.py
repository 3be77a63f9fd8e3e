"""Token-labeling targets and loss.

The loss never builds [B, M, C] targets: with Z = sum_k exp(l_k) + (C - K) the "reference" target is
exp(l_k) / Z on the K listed classes and 1 / Z on each other class, so the soft cross entropy needs only the
K gathered logits, the logsumexp and the sum of the model's logits (``sparse_soft_ce``).

MixToken. The model swaps a box of patch tokens with the batch-flipped sample and un-mixes the aux logits
(``models/lvvit.py``), so dense targets stay per sample; the loss mixes the class target with
lam = 1 - box area / M.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.lvvit import LVViTDenseOutput
from token_label.maps import EMPTY, check_target


def mixtoken_lam(bbox: Optional[Tuple[int, int, int, int]], num_patches: int) -> float:
    """lam = 1 - box area / M for a MixToken box (top, left, bottom, right); 1.0 without a box."""
    if bbox is None:
        return 1.0
    top, left, bottom, right = bbox
    return 1.0 - (bottom - top) * (right - left) / float(num_patches)


def _slots(label_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, 2, K, S1, S2] -> (values [B, M, K] float, class indices [B, M, K] int64, -1 = empty)."""
    b, _, k = label_map.shape[:3]
    values = label_map[:, 0].float().reshape(b, k, -1).transpose(1, 2)
    idx = label_map[:, 1].round().long().reshape(b, k, -1).transpose(1, 2)
    return values, idx


def _target_weights(values: torch.Tensor, idx: torch.Tensor, num_classes: int, target: str
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft target of each location as (weights [.., K] of the listed classes, weight [..] of each class
    not listed). "reference": zero-filled softmax over all C, Z = sum_k exp(l_k) + (C - K);
    "topk": softmax over the listed values, 0 elsewhere."""
    listed = idx >= 0
    masked = values.masked_fill(~listed, float("-inf"))
    if target == "reference":
        rest = (num_classes - listed.sum(-1)).to(values.dtype)
        log_z = torch.logsumexp(torch.cat([masked, rest.log().unsqueeze(-1)], -1), -1)  # log 0 = -inf: no rest
        # no unlisted class: weight 0 (1 / Z itself can be huge there, and would only cancel out)
        others = torch.where(rest > 0, torch.exp(-log_z), torch.zeros_like(log_z))
    else:
        log_z = torch.logsumexp(masked, -1)
        others = torch.zeros_like(log_z)
    listed_w = torch.where(listed, (masked - log_z.unsqueeze(-1)).exp(), torch.zeros_like(values))
    return listed_w, others


def dense_targets(label_map: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                  target: str = "reference") -> torch.Tensor:
    """[B, 2, K, S, S] label map -> explicit soft targets [B, S*S, C] (positions row-major), smoothed.

    For tests and analysis; the loss uses the closed form and never builds this tensor.
    """
    check_target(target)
    values, idx = _slots(label_map)
    listed_w, others = _target_weights(values, idx, num_classes, target)
    out = others.unsqueeze(-1).expand(*others.shape, num_classes + 1).clone()
    out.scatter_(-1, idx.masked_fill(idx < 0, num_classes), listed_w)  # empty slots land in a spare column
    return out[..., :num_classes] * (1.0 - smoothing) + smoothing / num_classes


def class_logits(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, 2, K, S1, S2] label map -> [B, C] zero-filled logits averaged over its S1*S2 locations.

    On a whole-image map this is roi_align to 1 x 1 over the whole map (its samples fall on the cell
    centres); on the dataset's 1 x 1 crop-pooled map it is that map's C-vector.
    """
    values, idx = _slots(label_map)
    b, m = values.shape[:2]
    listed = idx >= 0
    out = torch.zeros(b, num_classes + 1, dtype=values.dtype, device=values.device)
    out.scatter_add_(1, idx.masked_fill(~listed, num_classes).reshape(b, -1),
                     values.masked_fill(~listed, 0.0).reshape(b, -1))
    return out[:, :num_classes] / m


def sparse_soft_ce(logits: torch.Tensor, listed_w: torch.Tensor, idx: torch.Tensor, others: torch.Tensor,
                   smoothing: float = 0.0) -> torch.Tensor:
    """Soft cross entropy -sum_c t_c log softmax(logits)_c without building t: [.., C] logits -> [..].

    t = (1 - eps) * u + eps / C with u_c = listed_w[k] for c = idx[k] (idx -1: unused) and ``others`` for
    every class not listed. Since sum_c t_c = 1, CE = logsumexp(x) - sum_c t_c x_c, and
    sum_c u_c x_c = sum_k (listed_w_k - others) x_{idx_k} + others * sum_c x_c.
    """
    x = logits.float()
    c = x.shape[-1]
    total = x.sum(-1)
    listed = x.gather(-1, idx.clamp(min=0))
    w = torch.where(idx >= 0, listed_w - others.unsqueeze(-1), torch.zeros_like(listed_w))
    expected = (1.0 - smoothing) * ((w * listed).sum(-1) + others * total) + smoothing / c * total
    return torch.logsumexp(x, -1) - expected


class TokenLabelCrossEntropy(nn.Module):
    """cls_weight * softCE(cls, class target) + dense_weight * softCE(aux, dense targets).

    forward(outputs, targets):
      outputs: ``LVViTDenseOutput`` / tuple (cls [B, C], aux [B, M, C], bbox or None[, mask [B, M] or None]);
      targets: (label [B] int or [B, C] soft, label map [B, 2, K, S, S] with S*S == M[, class map
        [B, 2, Kc, 1, 1]]), label maps in the file format (module docstring).
    target="reference": the class target is the softmax over all C of ``class_logits(class map)`` (the
    dataset's crop-pooled map), or of the label map pooled over all its locations when no class map is
    given; ``ground_truth=True`` mixes it with the label (r * t + (1 - r) * gt, r = 0.9 - 0.4 * [argmax
    agrees]). target="topk": the class target is the label. Targets built here are label-smoothed by
    ``smoothing``; a soft [B, C] label is used as given. With a MixToken box the class target becomes
    lam * t + (1 - lam) * t.flip(0). The dense loss is averaged over the positions where ``mask`` is True.
    """

    def __init__(self, cls_weight: float = 1.0, dense_weight: float = 1.0, smoothing: float = 0.1, *,
                 target: str = "reference", ground_truth: bool = False) -> None:
        super().__init__()
        check_target(target)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if ground_truth and target != "reference":
            raise ValueError("ground_truth mixing needs target='reference' (the 'topk' class target is the label)")
        self.cls_weight = cls_weight
        self.dense_weight = dense_weight
        self.smoothing = smoothing
        self.target = target
        self.ground_truth = ground_truth

    def forward(self, outputs: Union[LVViTDenseOutput, Sequence[Any]], targets: Sequence[torch.Tensor]
                ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or len(outputs) not in (3, 4):
            raise TypeError("TokenLabelCrossEntropy needs the dense training output (cls, aux, bbox[, mask]); "
                            "build the model with return_dense=True and call it in train mode")
        cls, aux, bbox = outputs[0], outputs[1], outputs[2]
        mask = outputs[3] if len(outputs) == 4 else None
        if len(targets) not in (2, 3):
            raise ValueError(f"targets must be (label, label map[, class map]), got {len(targets)} items")
        label, label_map = targets[0].to(cls.device), self._checked(targets[1], aux)
        class_map = self._checked(targets[2], aux, dense=False) if len(targets) == 3 else None
        t = self.class_target(label, label_map if class_map is None else class_map, cls.shape[-1])
        if bbox is not None:
            lam = mixtoken_lam(bbox, aux.shape[1])
            t = lam * t + (1.0 - lam) * t.flip(0)
        loss_cls = torch.sum(-t * F.log_softmax(cls.float(), dim=-1), dim=-1).mean()
        if self.dense_weight == 0:
            return self.cls_weight * loss_cls
        return self.cls_weight * loss_cls + self.dense_weight * self._dense_ce(aux, label_map, mask)

    def _checked(self, label_map: torch.Tensor, aux: torch.Tensor, dense: bool = True) -> torch.Tensor:
        """Validate a [B, 2, K, S1, S2] map against aux [B, M, C]; returns it on aux's device."""
        b, m, c = aux.shape
        if label_map.dim() != 5 or label_map.shape[1] != 2 or label_map.shape[0] != b:
            raise ValueError(f"label map must be [B={b}, 2, K, S, S], got {tuple(label_map.shape)}")
        s1, s2 = label_map.shape[3:]
        if dense and s1 * s2 != m:
            raise ValueError(f"label map is {s1}x{s2} but the model has {m} patch positions; "
                             f"set --token-label-size to the patch grid side")
        label_map = label_map.to(aux.device, non_blocking=True)
        idx = label_map[:, 1]
        if bool(((idx >= c) | (idx < EMPTY)).any()):
            raise ValueError(f"label map class index {int(idx.max())} out of range for {c} classes")
        return label_map

    def class_target(self, label: torch.Tensor, class_map: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Class-token soft target [B, C] before MixToken (see the class docstring)."""
        eps, c = self.smoothing, num_classes
        if label.dim() == 1:
            gt_index = label.long()
            gt = F.one_hot(gt_index, c).float() * (1.0 - eps) + eps / c
        else:
            gt_index, gt = label.argmax(-1), label.float()
        if self.target == "topk":
            return gt
        teacher = class_logits(class_map, c).softmax(-1)
        t = teacher * (1.0 - eps) + eps / c
        if not self.ground_truth:
            return t
        ratio = (0.9 - 0.4 * (teacher.argmax(-1) == gt_index).float()).unsqueeze(-1)
        return ratio * t + (1.0 - ratio) * gt

    def dense_loss(self, aux: torch.Tensor, label_map: torch.Tensor, mask: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """Soft CE of aux [B, M, C] against the dense targets of label_map [B, 2, K, S, S] (no [B, M, C]
        target is built), averaged over the positions where ``mask`` [B, M] is True (all when None)."""
        return self._dense_ce(aux, self._checked(label_map, aux), mask)

    def _dense_ce(self, aux: torch.Tensor, label_map: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        values, idx = _slots(label_map)
        listed_w, others = _target_weights(values, idx, aux.shape[-1], self.target)
        ce = sparse_soft_ce(aux, listed_w, idx, others, self.smoothing)
        if mask is None:
            return ce.mean()
        w = mask.to(ce.dtype)
        return (ce * w).sum() / w.sum().clamp_min(1.0)


class TokenLabelCriterion(nn.Module):
    """Engine-facing wrapper: ``criterion(samples, outputs, targets)`` like DeiT's DistillationLoss.

    ``samples`` is unused (the common signature); ``outputs`` is the model's dense training output;
    ``targets`` the data set's (label [B], label map [B, 2, K, S, S][, class map]) tuple.
    """

    def __init__(self, cls_weight: float = 1.0, dense_weight: float = 1.0, smoothing: float = 0.1, *,
                 target: str = "reference", ground_truth: bool = False) -> None:
        super().__init__()
        self.loss = TokenLabelCrossEntropy(cls_weight, dense_weight, smoothing, target=target,
                                           ground_truth=ground_truth)

    def forward(self, samples: torch.Tensor, outputs: Any, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.loss(outputs, targets)
