"""Label-aware augmentation: the training transform that moves the label map with the image.

Order (TokenLabeling's): horizontal flip of the whole image and its map, then RandAugment on the whole
image, whose spatial ops (Rotate, Shear, Translate) warp the map by the image's affine maps (composed,
sampled once, nearest), then the random resized crop, whose box goes through ``roi_align`` (continuous
coordinates: map cell k covers the same image span as [k, k + 1)) for the dense target and, pooled to
1 x 1, for the class-token target. So both targets see the map after RandAugment, as in TokenLabeling.
Where a warped location comes from outside the image (the image shows fill colour there): "reference"
puts zero logits (all classes absent: a uniform target, TokenLabeling's zero fill), "topk" the one-hot
image class. Colour ops, colour jitter and random erasing touch the image only.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp

from augment import posterize_any_bits  # the repository's top-level augment.py (absolute import)
from token_label.maps import (check_target, dense_slots, dense_to_sparse, dense_to_topk, scatter_logits,
                              topk_to_dense)

SPATIAL_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


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
    absolute TranslateX/Y ops move up to the same 45 % of the side as the relative ones.

    The same values as timm's ``transforms_imagenet_train`` (timm/data/transforms_factory.py, the
    ``aa_params`` built before ``rand_augment_transform``) and TokenLabeling's copy of it; timm computes them
    inline and has no function that returns them, so they are computed here.
    """
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

    Horizontal flip -> label-aware RandAugment (``auto_augment`` "rand-...") or, with no auto-augment, colour
    jitter, both on the whole image -> random resized crop -> ToTensor -> Normalize -> random erasing (image
    only), TokenLabeling's order (module docstring).
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
        check_target(target)
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
        # TokenLabeling's order: flip and RandAugment the whole image and its map, then crop both
        if self.hflip > 0 and random.random() < self.hflip:
            img = TF.hflip(img)
            maps = maps.flip(-1)
        if self.rand_augment is not None:
            img, maps = self.rand_augment(img, maps, fill)
        elif self.color_jitter is not None:
            img = self.color_jitter(img)
        img_w, img_h = img.size
        box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interp = self.crop.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        img = TF.resized_crop(img, *box, [self.input_size, self.input_size], interp)
        dense = crop_dense_map(maps, box, (img_h, img_w), self.label_size)
        x = self.normalize(img)
        if self.erase is not None:
            x = self.erase(x)
        if self.target == "topk":
            return x, (dense_to_topk(classes, dense, k),)
        pooled = crop_dense_map(maps, box, (img_h, img_w), 1)
        return x, (dense_to_sparse(classes, dense, dense_slots(k, map_h, map_w, self.label_size)),
                   dense_to_sparse(classes, pooled, k * map_h * map_w))
