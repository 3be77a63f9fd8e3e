"""Label maps: the file format, reading and validating files, and conversions between the format and
dense maps over the classes a map lists.

Format. One file per training image, ``<label_root>/<class dir>/<image stem>.pt``, holding a float tensor
[2, K, H, W] (the published format, e.g. the NFNet-F6 ImageNet set: K = 5, H = W = 14): channel 0 the
teacher's raw top-K logits at each location, channel 1 their class indices (as float). A batch is
[B, 2, K, S, S]. Augmented maps use the same format with two additions: an index of -1 (``EMPTY``) marks an
unused slot (its value is ignored), and K may be larger than the file's K (see ``dense_slots``).

Exact resampling without [C, H, W]. ``roi_align`` works per channel, and a class absent from the whole map
is 0 everywhere before and after it, so a map is made dense only over the U classes present in the file
([U, H, W], U <= K*H*W, ``scatter_logits``) and resampled there. ``dense_to_sparse`` turns the result back
into the format with every class that is non-zero at a location (classes at exactly 0 equal the absent ones).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

TARGETS = ("reference", "topk")
EMPTY = -1.0  # class index of an unused slot


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


# ---- files -------------------------------------------------------------------------------------------
class LabelMapError(OSError):
    """A label-map file that is missing, unreadable or malformed (an OSError, so the image-folder retry
    loop treats it like an undecodable image). The message names the file."""


def label_path_for(image_path: str, label_root: str) -> str:
    """``<label_root>/<class dir of image>/<image stem>.pt``."""
    cls_dir = os.path.basename(os.path.dirname(image_path))
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(label_root, cls_dir, stem + ".pt")


def load_label_map(path: str, num_classes: Optional[int] = None) -> torch.Tensor:
    """Load and validate a label-map file -> float32 [2, K, H, W]; LabelMapError naming ``path`` if bad.

    Checks: shape, finite values, integral class indices in [0, num_classes) that differ at each location.
    """
    if not os.path.isfile(path):
        raise LabelMapError(f"token label map not found: {path}")
    try:
        m = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a tensor file, pickle with code
        first = (str(e).strip().splitlines() or [""])[0]
        raise LabelMapError(f"cannot read token label map {path}: {type(e).__name__}: {first}") from None
    if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != 2 or 0 in m.shape:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise LabelMapError(f"token label map {path}: expected a tensor [2, K, H, W], got {shape}")
    m = m.float()
    if not bool(torch.isfinite(m).all()):
        raise LabelMapError(f"token label map {path}: non-finite values")
    idx = m[1]
    if bool((idx != idx.round()).any()) or float(idx.min()) < 0 or \
            (num_classes is not None and float(idx.max()) >= num_classes):
        raise LabelMapError(f"token label map {path}: class indices must be integers in [0, {num_classes}), "
                            f"got {float(idx.min()):g}..{float(idx.max()):g}")
    ordered = idx.sort(0).values
    if bool((ordered[1:] == ordered[:-1]).any()):
        raise LabelMapError(f"token label map {path}: a location lists the same class twice")
    return m


# ---- label-map format <-> dense over the classes present ----------------------------------------------
def scatter_logits(label_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[2, K, H, W] map -> (classes [U] int64, zero-filled logits [U, H, W]) over the U listed classes.

    logits[u, y, x] is the logit of class classes[u] at (y, x), 0 where that class is not listed: the
    zero-filled C-vector restricted to the only classes that can be non-zero. Empty slots (-1) are skipped.
    """
    values, idx = label_map[0], label_map[1].round().long()
    listed = idx >= 0
    classes = idx[listed].unique()
    dense = torch.zeros(classes.numel() + 1, *values.shape[1:], dtype=values.dtype)
    # empty slots go to a spare last row that is cut off
    pos = torch.where(listed, torch.searchsorted(classes, idx.clamp(min=0)), classes.numel())
    dense.scatter_(0, pos, torch.where(listed, values, torch.zeros_like(values)))
    return classes, dense[:-1]


def topk_to_dense(label_map: torch.Tensor, extra_class: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """[2, K, H, W] map -> (classes [U] int64, probabilities [U, H, W]) for target="topk".

    probs[:, y, x] is the softmax over the listed values at (y, x) put onto their classes (0 elsewhere).
    ``extra_class`` (the image class, used as fill) joins the class set.
    """
    values, idx = label_map[0], label_map[1].round().long()
    listed = idx >= 0
    classes = idx[listed].unique()
    if extra_class is not None:
        classes = torch.unique(torch.cat([classes, torch.tensor([int(extra_class)])]))
    probs_k = values.masked_fill(~listed, float("-inf")).softmax(dim=0).nan_to_num(0.0)
    pos = torch.where(listed, torch.searchsorted(classes, idx.clamp(min=0)), classes.numel())
    dense = torch.zeros(classes.numel() + 1, *values.shape[1:], dtype=probs_k.dtype)
    dense.scatter_add_(0, pos, probs_k)
    return classes, dense[:-1]


def dense_slots(k: int, map_h: int, map_w: int, out_size: int) -> int:
    """Slots that hold every non-zero class after resampling a K-slot map_h x map_w map to out_size^2.

    A bin of roi_align spans at most ceil(map / out) cells, sampled at that many points per side, and
    bilinear sampling adds one neighbour: (ceil(h / S) + 1) * (ceil(w / S) + 1) cells of K classes each.
    """
    return k * (math.ceil(map_h / out_size) + 1) * (math.ceil(map_w / out_size) + 1)


def dense_to_sparse(classes: torch.Tensor, logits: torch.Tensor, slots: int) -> torch.Tensor:
    """(classes [U], zero-filled logits [U, h, w]) -> label map [2, slots, h, w] of the non-zero classes.

    Slots are ordered by logit, largest first; unused slots have index -1 and value 0. Raises if a location
    has more than ``slots`` non-zero classes (the bound of ``dense_slots`` was violated).
    """
    u, h, w = logits.shape
    nonzero = logits != 0
    if u and int(nonzero.sum(0).max()) > slots:
        raise RuntimeError(f"{int(nonzero.sum(0).max())} non-zero classes at a location, only {slots} slots")
    keyed = torch.where(nonzero, logits, torch.full_like(logits, float("-inf")))
    n = min(slots, u)
    vals, pos = keyed.topk(n, dim=0)
    used = torch.isfinite(vals)
    out = torch.zeros(2, slots, h, w)
    out[1].fill_(EMPTY)
    out[0, :n] = torch.where(used, vals, torch.zeros_like(vals))
    out[1, :n] = torch.where(used, classes[pos].float(), torch.full_like(vals, EMPTY))
    return out


def dense_to_topk(classes: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """(classes [U], probabilities [U, h, w]) -> [2, k, h, w] (log-probabilities, class indices) for
    target="topk": the k most likely classes per location; zero-probability slots are empty (-1)."""
    u, h, w = probs.shape
    n = min(k, u)
    vals, pos = probs.topk(n, dim=0)
    used = vals > 0
    out = torch.zeros(2, k, h, w)
    out[1].fill_(EMPTY)
    out[0, :n] = torch.where(used, vals.clamp_min(1e-30).log(), torch.zeros_like(vals))
    out[1, :n] = torch.where(used, classes[pos].float(), torch.full_like(vals, EMPTY))
    return out
