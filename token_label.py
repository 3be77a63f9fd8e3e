"""Token labeling (LV-ViT): dense label maps, label-aware augmentation, and the token-labeling loss.

Label-map format. One file per training image, ``<label_root>/<class dir>/<image stem>.pt``, holding a
float tensor [2, K, H, W] (the published format, e.g. the NFNet-F6 ImageNet set: K = 5, H = W = 14):
channel 0 the teacher's raw top-K logits at each location, channel 1 their class indices (as float). A
batch is [B, 2, K, S, S]. The same format carries augmented maps, with two additions: an index of -1 marks
an empty slot (its value is ignored), and K may be larger than the file's K (see below).

Targets (``target=``):
  * "reference" (default; what LV-ViT's official token-labeling code does, and what produced Table 3):
    a location's logits are zero-filled to all C classes (listed classes get their logit, every other class
    0). The crop resamples this zero-filled map with ``roi_align`` over the crop box at full C, and the
    dense target is the softmax over all C classes. The class-token target is the same map pooled over the
    whole crop (``roi_align`` to 1 x 1), softmax over all C; with ``ground_truth=True`` it is mixed with the
    one-hot label as ``r * t + (1 - r) * gt``, r = 0.9 - 0.4 * [argmax t == label].
  * "topk" (this repository's earlier choice): the dense target is the softmax over the K listed values
    only (independent of C and of the teacher's logit scale); the class target is the one-hot label.
Label smoothing: every target built here becomes ``(1 - eps) * t + eps / C``.

Exact resampling without [C, H, W]. ``roi_align`` works per channel, and a class absent from the whole map
is 0 everywhere before and after it, so the map is made dense only over the U classes present in the file
([U, H, W], U <= K*H*W) and resampled there. The result goes back to the label-map format with every class
that is non-zero at a location (classes at exactly 0 are equal to the absent ones). Bilinear sampling of a
bin touches at most (ceil(H / S) + 1) x (ceil(W / S) + 1) source cells, so K_out = K times that slots hold
every non-zero class (20 for 14 -> 14, K = 5). The crop-pooled class logits are stored the same way as a
1 x 1 map with K*H*W slots. The loss never builds [B, M, C] targets: with Z = sum_k exp(l_k) + (C - K) the
target is exp(l_k) / Z on the K listed classes and 1 / Z on each other class, so the soft cross entropy
needs only the K gathered logits, the logsumexp and the sum of the model's logits (see ``sparse_soft_ce``).

Label-aware augmentation. The map covers the whole image. The random-resized-crop box goes through
``roi_align`` (continuous coordinates, so map cell k covers the same image span as [k, k + 1)), the
horizontal flip flips the resampled map, and the spatial RandAugment ops (Rotate, Shear, Translate) warp it
with the image's affine maps, composed and sampled once, nearest. Our choice where a warped location comes
from outside the image (the image shows fill colour there): "reference" puts zero logits (all classes
absent: uniform target), "topk" the one-hot image class. The class-token target is pooled over the crop
box, before RandAugment. Colour ops, colour jitter and random erasing touch the image only.

MixToken. The model swaps a box of patch tokens with the batch-flipped sample and un-mixes the aux logits
(``models/lvvit.py``), so dense targets stay per sample; the loss mixes the class target with
lam = 1 - box area / M.

Bad data (``errors.DataError``, one line naming the file): an unreadable image or label map, a label map of
the wrong shape or with bad class indices, or a class folder missing under the label root. With
``skip_bad_images`` an unreadable image or label map is replaced by the next readable sample and counted
(``datasets.skipped_images`` / ``bad_images``); a missing class folder is always an error (wrong label set).
"""
from __future__ import annotations

import math
import os
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp

from augment import posterize_any_bits
from datasets import SafeImageFolder
from errors import DataError
from models.lvvit import LVViTDenseOutput, spread_to_positions  # noqa: F401  (re-exported helper)

__all__ = [
    "TARGETS", "LabelMapError", "load_label_map", "label_path_for", "scatter_logits", "topk_to_dense",
    "dense_to_sparse", "dense_to_topk", "dense_slots", "crop_dense_map", "affine_dense_map",
    "spatial_op_matrix", "SPATIAL_OPS", "LabelAwareRandAugment", "TokenLabelTransform", "TokenLabelImageFolder",
    "SyntheticTokenLabels", "build_token_label_dataset", "dense_targets", "class_logits", "sparse_soft_ce",
    "mixtoken_lam", "TokenLabelCrossEntropy", "TokenLabelCriterion", "spread_to_positions",
]

TARGETS = ("reference", "topk")
SPATIAL_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
EMPTY = -1.0  # class index of an unused slot


def _check_target(target: str) -> None:
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


# ---- spatial transforms of the map -------------------------------------------------------------------
def crop_dense_map(maps: torch.Tensor, box: Tuple[float, float, float, float], image_size: Tuple[int, int],
                   out_size: int) -> torch.Tensor:
    """Resample a map [U, H, W] covering the whole image to an image crop box, by roi_align.

    box: (top, left, height, width) in image pixels (torchvision's crop convention); image_size: (img_h,
    img_w). Returns [U, out_size, out_size]; out_size 1 pools the whole box. roi_align is linear and works
    per channel, so on zero-filled logits this equals the full-C resampling restricted to the U classes.
    """
    top, left, bh, bw = box
    img_h, img_w = image_size
    h, w = maps.shape[-2:]
    sy, sx = h / img_h, w / img_w  # image pixels -> map cells
    boxes = torch.tensor([[0.0, left * sx, top * sy, (left + bw) * sx, (top + bh) * sy]], dtype=maps.dtype)
    # aligned=True: cell k spans [k, k + 1) like image pixel k; the same as the -0.5-shifted box with
    # aligned=False that LV-ViT's code uses, for any box of at least one cell.
    return roi_align(maps[None], boxes, output_size=out_size, spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)[0]


def spatial_op_matrix(name: str, level: float, img_w: int, img_h: int) -> Tuple[float, ...]:
    """PIL affine coefficients (a, b, c, d, e, f), output -> input pixel coordinates, of the timm
    RandAugment spatial op ``name`` applied with level argument ``level`` to an img_w x img_h image."""
    if name == "ShearX":
        return (1.0, level, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, level, 1.0, 0.0)
    if name == "TranslateXRel":
        return (1.0, 0.0, level * img_w, 0.0, 1.0, 0.0)
    if name == "TranslateYRel":
        return (1.0, 0.0, 0.0, 0.0, 1.0, level * img_h)
    if name == "TranslateX":
        return (1.0, 0.0, level, 0.0, 1.0, 0.0)
    if name == "TranslateY":
        return (1.0, 0.0, 0.0, 0.0, 1.0, level)
    if name == "Rotate":
        # PIL rotates counter-clockwise about the centre; the inverse map rotates by -angle around it.
        a = -math.radians(level)
        cos, sin = math.cos(a), math.sin(a)
        cx, cy = img_w / 2.0, img_h / 2.0
        return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    raise ValueError(f"not a spatial op: {name}")


def affine_dense_map(maps: torch.Tensor, matrices: Sequence[Sequence[float]], img_w: int, img_h: int,
                     fill: torch.Tensor) -> torch.Tensor:
    """Warp a map [U, h, w] covering an img_w x img_h image by the image's chain of PIL affine ops.

    ``matrices``: the (a, b, c, d, e, f) output -> input coefficients of the ops in the order they were
    applied. Each cell centre is mapped back through the ops (last op first); a point that leaves the image
    at any step shows fill colour in the image, so that cell takes ``fill`` [U]. The map is sampled once,
    nearest, at the final source point, so successive ops do not compound the grid quantisation.
    """
    u, h, w = maps.shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (img_h / h)  # cell centres in image pixels
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (img_w / w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    inside = torch.ones(h, w, dtype=torch.bool)
    for a, b, c, d, e, f in reversed([tuple(m) for m in matrices]):
        xx, yy = a * xx + b * yy + c, d * xx + e * yy + f
        inside &= (xx >= 0) & (xx < img_w) & (yy >= 0) & (yy < img_h)
    col = torch.floor(xx * (w / img_w)).long().clamp(0, w - 1)
    row = torch.floor(yy * (h / img_h)).long().clamp(0, h - 1)
    out = maps.reshape(u, h * w)[:, (row * w + col).flatten()].reshape(u, h, w)
    return torch.where(inside[None], out, fill.to(maps.dtype)[:, None, None])


class _AffineRecorder:
    """Stands in for a spatial op's image function: notes the op's affine map (from the level argument timm
    drew), then runs the original function. Picklable, for spawned DataLoader workers."""

    def __init__(self, name: str, fn: Callable, log: List[Tuple[float, ...]]) -> None:
        self.name, self.fn, self.log = name, fn, log

    def __call__(self, img: Image.Image, level: float, **kwargs: Any) -> Image.Image:
        self.log.append(spatial_op_matrix(self.name, float(level), img.size[0], img.size[1]))
        return self.fn(img, level, **kwargs)


class LabelAwareRandAugment:
    """timm RandAugment whose spatial ops move the label map with the image.

    The ops are timm's own ``AugmentOp`` objects from ``rand_augment_transform`` and run unchanged (their
    probability and magnitude draws included); the image function of each spatial op is wrapped to record
    the affine map it applies, and the recorded chain is then applied to the map. The ops of a call are
    chosen here with Python's ``random`` (torch reseeds it in every DataLoader worker).
    """

    def __init__(self, config_str: str, hparams: Optional[Dict[str, Any]] = None,
                 transforms: Optional[List[str]] = None) -> None:
        ra = rand_augment_transform(config_str, dict(hparams or {}), transforms=transforms)
        self._applied: List[Tuple[float, ...]] = []
        self.ops = list(ra.ops)
        for op in self.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
            elif op.name in SPATIAL_OPS:
                op.aug_fn = _AffineRecorder(op.name, op.aug_fn, self._applied)
        self.num_layers = ra.num_layers
        self.choice_weights = None if ra.choice_weights is None else [float(w) for w in ra.choice_weights]

    def _choose(self) -> list:
        if self.choice_weights is None:
            return random.choices(self.ops, k=self.num_layers)
        # a weighted op set draws without replacement
        pool, weights, chosen = list(self.ops), list(self.choice_weights), []
        for _ in range(min(self.num_layers, len(pool))):
            i = random.choices(range(len(pool)), weights=weights, k=1)[0]
            chosen.append(pool.pop(i))
            weights.pop(i)
        return chosen

    def __call__(self, img: Image.Image, maps: torch.Tensor, fill: torch.Tensor
                 ) -> Tuple[Image.Image, torch.Tensor]:
        """img: PIL image; maps [U, h, w] over the same image; fill [U]. Returns both transformed."""
        self._applied.clear()
        for op in self._choose():
            img = op(img)
        if self._applied:
            maps = affine_dense_map(maps, list(self._applied), img.size[0], img.size[1], fill)
        return img, maps


def _randaugment_hparams(input_size: int, mean: Sequence[float], interpolation: str) -> Dict[str, Any]:
    """RandAugment settings that depend on the image: areas uncovered by an op take the mean colour; the
    absolute TranslateX/Y ops move up to the same 45 % of the side as the relative ones."""
    params: Dict[str, Any] = {
        "img_mean": tuple(int(round(255 * min(max(float(v), 0.0), 1.0))) for v in mean),
        "translate_const": int(0.45 * input_size),
    }
    if interpolation and interpolation != "random":
        params["interpolation"] = str_to_pil_interp(interpolation)
    return params


# ---- joint image + label-map transform ----------------------------------------------------------------
class TokenLabelTransform:
    """Training transform of (PIL image, label map [2, K, H, W], class index) for token labeling.

    Random resized crop -> horizontal flip -> label-aware RandAugment (``auto_augment`` "rand-...") or, with
    no auto-augment, colour jitter -> ToTensor -> Normalize -> random erasing (image only).
    Returns (image [3, input_size, input_size], label tensors):
      target="reference": (dense map [2, K_out, S, S], crop-pooled class map [2, K*H*W, 1, 1]) with
        K_out = ``dense_slots(K, H, W, S)``, zero-filled logit semantics (module docstring);
      target="topk": (dense map [2, K, S, S] of log-probabilities,).
    S = ``label_size``.
    """

    def __init__(self, input_size: int, label_size: int, *, auto_augment: Optional[str],
                 color_jitter: Optional[float], interpolation: str, re_prob: float, re_mode: str, re_count: int,
                 target: str, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 ra_transforms: Optional[List[str]] = None) -> None:
        _check_target(target)
        self.target = target
        self.input_size = int(input_size)
        self.label_size = int(label_size)
        self.hflip = hflip
        self.crop = RandomResizedCropAndInterpolation(self.input_size, scale=scale, ratio=ratio,
                                                      interpolation=interpolation)
        self.rand_augment = None
        self.color_jitter = None
        if auto_augment and auto_augment.strip().lower() != "none":
            if not auto_augment.startswith("rand"):
                raise ValueError(f"aa: token labeling supports RandAugment ('rand-...') or none, got {auto_augment!r}")
            try:
                self.rand_augment = LabelAwareRandAugment(
                    auto_augment, _randaugment_hparams(self.input_size, mean, interpolation), ra_transforms)
            except (AssertionError, KeyError, ValueError) as e:  # timm validates the string with asserts
                raise ValueError(f"aa: bad RandAugment setting {auto_augment!r}: {type(e).__name__}: {e}") from None
        elif color_jitter:
            self.color_jitter = T.ColorJitter(*((float(color_jitter),) * 3))
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean=mean, std=std)])
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu") if re_prob > 0 else None

    def _maps(self, label_map: torch.Tensor, class_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes [U], maps [U, H, W], fill [U]) in the representation of ``self.target``."""
        if self.target == "reference":
            classes, maps = scatter_logits(label_map)
            return classes, maps, maps.new_zeros(classes.numel())  # outside: all classes absent
        classes, maps = topk_to_dense(label_map, extra_class=class_index)
        return classes, maps, (classes == int(class_index)).to(maps.dtype)  # outside: the image class

    def __call__(self, img: Image.Image, label_map: torch.Tensor, class_index: int
                 ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        k, map_h, map_w = label_map.shape[1:]
        classes, maps, fill = self._maps(label_map, class_index)
        img_w, img_h = img.size
        box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interp = self.crop.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        img = TF.resized_crop(img, *box, [self.input_size, self.input_size], interp)
        dense = crop_dense_map(maps, box, (img_h, img_w), self.label_size)
        if self.hflip > 0 and random.random() < self.hflip:
            img = TF.hflip(img)
            dense = dense.flip(-1)
        if self.rand_augment is not None:
            img, dense = self.rand_augment(img, dense, fill)
        elif self.color_jitter is not None:
            img = self.color_jitter(img)
        x = self.normalize(img)
        if self.erase is not None:
            x = self.erase(x)
        if self.target == "topk":
            return x, (dense_to_topk(classes, dense, k),)
        pooled = crop_dense_map(maps, box, (img_h, img_w), 1)
        return x, (dense_to_sparse(classes, dense, dense_slots(k, map_h, map_w, self.label_size)),
                   dense_to_sparse(classes, pooled, k * map_h * map_w))


# ---- data sets -------------------------------------------------------------------------------------------
class TokenLabelImageFolder(SafeImageFolder):
    """Image folder whose items are ``(image, (class index, *label tensors))``.

    The label map of ``<root>/<class>/<name>.<ext>`` is ``<label_root>/<class>/<name>.pt``. ``transform`` is
    a joint (img, label_map, class_index) -> (image, label tensors) transform such as
    :class:`TokenLabelTransform`; None gives the PIL image and the raw map [2, K, H, W]. Bad input raises
    ``errors.DataError`` naming the file, or with ``skip_bad_images`` is replaced and counted (module docstring).
    """

    def __init__(self, root: str, label_root: str, transform: Optional[Callable[..., Any]] = None, *,
                 skip_bad_images: bool = False) -> None:
        for what, path in (("image", root), ("token label", label_root)):
            if not os.path.isdir(path):
                raise DataError(f"{what} folder not found: {path}")
        try:
            super().__init__(root, transform=None, skip_bad_images=skip_bad_images)
        except FileNotFoundError as e:  # torchvision: no class folder / no image file
            raise DataError(f"empty image folder {root} (expected <class>/<image> inside): {e}") from None
        missing = [c for c in self.classes if not os.path.isdir(os.path.join(label_root, c))]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"token label folder missing for class {missing[0]!r}: "
                            f"{os.path.join(label_root, missing[0])}{more}")
        self.label_root = label_root
        self.joint_transform = transform

    def _load_sample(self, index: int) -> Tuple[Image.Image, Tuple[int, torch.Tensor]]:
        path, class_index = self.samples[index]
        img = self.loader(path)
        label_map = load_label_map(label_path_for(path, self.label_root), len(self.classes))
        return img, (class_index, label_map)

    def __getitem__(self, index: int) -> Tuple[Any, Tuple[Any, ...]]:
        try:
            img, (class_index, label_map) = self._get_checked(index)
        except DataError as e:
            # the retry loop words every failure as an image one; a label-map failure has its own message
            if isinstance(e.__context__, LabelMapError):
                raise DataError(str(e.__context__)) from None
            raise
        if self.joint_transform is None:
            return img, (class_index, label_map)
        x, labels = self.joint_transform(img, label_map, class_index)
        return x, (class_index, *labels)


class SyntheticTokenLabels(torch.utils.data.Dataset):
    """Wrap an (image, class index) data set with deterministic synthetic label maps, for smoke tests and
    throughput runs without a label set (e.g. ``--data-set FAKE --token-label``).

    Item i: (image, (class index, map [2, k, S, S])) in the file format (raw logits): the image class is
    top-1 at every location (logit 2 + noise), the other k - 1 slots hold other classes with lower logits;
    the noise depends only on (seed, i). The map is not augmented.
    """

    def __init__(self, dataset: Any, num_classes: int, label_size: int = 14, k: int = 5, seed: int = 0) -> None:
        if num_classes < 1 or label_size < 1 or k < 1:
            raise ValueError("num_classes, label_size and k must be >= 1")
        self.dataset = dataset
        self.num_classes = num_classes
        self.label_size = label_size
        self.k = min(k, num_classes)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, Tuple[int, torch.Tensor]]:
        img, class_index = self.dataset[index]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s, k, c = self.label_size, self.k, self.num_classes
        # other classes: distinct random offsets from the image class at each location
        offs = torch.stack([torch.randperm(c - 1, generator=g)[:k - 1] + 1 for _ in range(s * s)]) \
            if k > 1 else torch.zeros(s * s, 0, dtype=torch.long)
        idx = torch.cat([torch.zeros(s * s, 1, dtype=torch.long), offs], 1)
        idx = (idx + int(class_index)) % c
        logits = torch.randn(s * s, k, generator=g) * 0.5 - torch.arange(k, dtype=torch.float32)
        logits[:, 0] += 2.0
        m = torch.stack([logits.T.reshape(k, s, s), idx.T.reshape(k, s, s).float()])
        return img, (int(class_index), m)


def build_token_label_dataset(root: str, label_root: str, input_size: int, label_size: int, *,
                              aa: Optional[str], color_jitter: Optional[float], interpolation: str,
                              re_prob: float, re_mode: str, re_count: int, target: str,
                              skip_bad_images: bool = False, scale: Tuple[float, float] = (0.08, 1.0),
                              ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5,
                              mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> TokenLabelImageFolder:
    """Token-labeling training set: image folder ``root`` with label maps under ``label_root``.

    The augmentation values come from the caller (the command line); none is defaulted here. ``aa`` None,
    '' or 'none' turns RandAugment off (colour jitter is used then). Items: (image [3, input_size,
    input_size], (class index, *label tensors)) as described by :class:`TokenLabelTransform`.
    Raises ``errors.DataError`` for bad data, ValueError for a bad ``aa`` / ``target``.
    """
    tf = TokenLabelTransform(input_size, label_size, auto_augment=aa, color_jitter=color_jitter,
                             interpolation=interpolation, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                             target=target, scale=scale, ratio=ratio, hflip=hflip, mean=mean, std=std)
    return TokenLabelImageFolder(root, label_root, tf, skip_bad_images=skip_bad_images)


# ---- targets and loss ---------------------------------------------------------------------------------
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
    _check_target(target)
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
        _check_target(target)
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
