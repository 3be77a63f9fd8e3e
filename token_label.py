"""Token labeling (LV-ViT) data and loss: dense label maps, label-aware augmentation, the token-labeling
cross entropy with MixToken target mixing.

Label-map format (the published one, e.g. the NFNet-F6 ImageNet set): one file per training image at
``<label_root>/<class dir>/<image stem>.pt`` holding a tensor [2, K, H, W] (K = 5, H = W = 14 by default):
channel 0 the top-K teacher logits per location, channel 1 their class indices (as float).

Dense targets (documented choice). A location's soft target is the softmax over its K stored logits,
scattered onto their K classes (all other classes get 0), then label-smoothed like the class target:
``t = (1 - eps) * p + eps / C``. Softmax over the top-K only (instead of scattering the logits into a
zero-filled C-vector and taking a full softmax) keeps the target independent of the teacher's logit scale
and of the number of classes C.

Label-aware augmentation. The map covers the full (un-cropped) image. Per sample it is made dense over the
classes that occur in it (plus the image class) -> probabilities [U, H, W]; the random-resized-crop box is
applied by ``torchvision.ops.roi_align`` over the same box, the horizontal flip by flipping, and the
spatial RandAugment ops (Rotate, ShearX/Y, TranslateX/Y[Rel]) by the same affine maps as the image,
composed and sampled once with nearest sampling; locations that fall outside the source take the image class (one-hot), since the image
there is the fill colour and carries no other evidence. The colour ops, colour jitter and random erasing
touch the image only. The result is stored back as top-K (log-probabilities, indices) [2, K, S, S], which
the loss reads like the original file (softmax over the K values = renormalised probabilities).

MixToken. The model swaps a box of patch tokens with the batch-flipped sample and un-mixes the aux logits
(see ``models/lvvit.py``); the loss mixes the class target with lam = 1 - box area / M and leaves the
dense targets per sample.
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
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp

from augment import posterize_any_bits
from models.lvvit import LVViTDenseOutput, spread_to_positions  # noqa: F401  (re-exported helper)

__all__ = [
    "load_label_map", "label_path_for", "topk_to_dense", "dense_to_topk", "crop_dense_map",
    "affine_dense_map", "spatial_op_matrix", "SPATIAL_OPS", "LabelAwareRandAugment",
    "TokenLabelTransform", "TokenLabelImageFolder", "SyntheticTokenLabels", "build_token_label_dataset",
    "build_token_label_dataset_from_args", "dense_targets", "mixtoken_lam", "TokenLabelCrossEntropy",
    "TokenLabelCriterion", "spread_to_positions",
]

_NEG = -1e4  # log-prob for padding / zero-probability entries: exp() underflows to exactly 0
SPATIAL_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


# ---- files -------------------------------------------------------------------------------------------
def label_path_for(image_path: str, label_root: str) -> str:
    """``<label_root>/<class dir of image>/<image stem>.pt``."""
    cls_dir = os.path.basename(os.path.dirname(image_path))
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(label_root, cls_dir, stem + ".pt")


def load_label_map(path: str) -> torch.Tensor:
    """Load and validate a label map file -> float32 [2, K, H, W]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token label map not found: {path}")
    m = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != 2:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"token label map {path}: expected a tensor [2, K, H, W], got {shape}")
    return m.float()


# ---- dense <-> top-k ---------------------------------------------------------------------------------
def topk_to_dense(label_map: torch.Tensor, extra_class: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """[2, K, H, W] top-K map -> (classes [U] int64, probs [U, H, W]) over the U classes present.

    probs[:, y, x] is the softmax over the K logits at (y, x) scattered onto their classes; classes not
    among the K at a location get 0. ``extra_class`` (e.g. the image class) is added to the class set.
    """
    logits, idx = label_map[0], label_map[1].round().long()
    classes = idx.unique()
    if extra_class is not None:
        classes = torch.unique(torch.cat([classes, torch.tensor([int(extra_class)])]))
    probs_k = logits.softmax(dim=0)  # [K, H, W]
    pos = torch.searchsorted(classes, idx)  # position of each class id in `classes`
    dense = torch.zeros(classes.numel(), *logits.shape[1:], dtype=probs_k.dtype)
    dense.scatter_add_(0, pos, probs_k)
    return classes, dense


def dense_to_topk(classes: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """(classes [U], probs [U, H, W]) -> [2, k, H, W] (log-probabilities, class indices as float).

    Pads with log-prob -1e4 (weight exactly 0 after softmax) when U < k.
    """
    u, h, w = probs.shape
    kk = min(k, u)
    vals, pos = probs.topk(kk, dim=0)
    logp = torch.where(vals > 0, vals.clamp_min(1e-30).log(), torch.full_like(vals, _NEG))
    idx = classes[pos].float()
    if kk < k:
        logp = torch.cat([logp, torch.full((k - kk, h, w), _NEG)], 0)
        idx = torch.cat([idx, torch.zeros(k - kk, h, w)], 0)
    return torch.stack([logp, idx], 0)


# ---- spatial transforms of the map -------------------------------------------------------------------
def crop_dense_map(probs: torch.Tensor, box: Tuple[float, float, float, float], image_size: Tuple[int, int],
                   out_size: int) -> torch.Tensor:
    """Apply an image crop box to a map covering the full image, by roi_align over the same box.

    probs: [U, H, W]; box: (top, left, height, width) in image pixels (torchvision crop convention);
    image_size: (img_h, img_w) of the image the box refers to. Returns [U, out_size, out_size].
    """
    top, left, bh, bw = box
    img_h, img_w = image_size
    h, w = probs.shape[-2:]
    sy, sx = h / img_h, w / img_w  # image pixels -> map cells (continuous coordinates, map spans [0, w])
    boxes = torch.tensor([[0.0, left * sx, top * sy, (left + bw) * sx, (top + bh) * sy]], dtype=probs.dtype)
    # aligned=True: continuous coordinates, so cell k covers [k, k + 1) exactly like the image pixels.
    return roi_align(probs[None], boxes, output_size=out_size, spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)[0]


def spatial_op_matrix(name: str, level: float, img_w: int, img_h: int) -> Tuple[float, ...]:
    """PIL affine coefficients (a, b, c, d, e, f), output -> input pixel coordinates, for a timm RandAugment
    spatial op applied with level argument ``level`` to a ``img_w`` x ``img_h`` image."""
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


def affine_dense_map(probs: torch.Tensor, matrices: Sequence[Sequence[float]], img_w: int, img_h: int,
                     fill: torch.Tensor) -> torch.Tensor:
    """Warp a map [U, h, w] covering a img_w x img_h image by the image's chain of PIL affine ops.

    ``matrices`` are the (a, b, c, d, e, f) output -> input coefficients of the ops in the order they were
    applied to the image (a single op: a list of one). Each cell centre is mapped back through the ops
    (last op first); a point that leaves the image at any intermediate step is fill colour in the image,
    so that cell takes ``fill`` [U]. The map is sampled once, nearest, at the final source point, so
    successive ops do not compound the grid quantisation.
    """
    u, h, w = probs.shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (img_h / h)  # cell centres in image pixels
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (img_w / w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    inside = torch.ones(h, w, dtype=torch.bool)
    for a, b, c, d, e, f in reversed([tuple(m) for m in matrices]):
        xx, yy = a * xx + b * yy + c, d * xx + e * yy + f
        inside &= (xx >= 0) & (xx < img_w) & (yy >= 0) & (yy < img_h)
    col = torch.floor(xx * (w / img_w)).long().clamp(0, w - 1)
    row = torch.floor(yy * (h / img_h)).long().clamp(0, h - 1)
    out = probs.reshape(u, h * w)[:, (row * w + col).flatten()].reshape(u, h, w)
    return torch.where(inside[None], out, fill.to(probs.dtype)[:, None, None])


class LabelAwareRandAugment:
    """timm RandAugment whose spatial ops are applied to the label map too.

    Built from timm's ``rand_augment_transform(config_str, hparams)`` op list; each op's probability and
    magnitude are sampled like timm's ``AugmentOp`` (prob, magnitude_std, magnitude_max, level_fn), the
    image goes through timm's own op function, and for spatial ops the same affine is applied to the map.
    Python's ``random`` drives every draw (torch reseeds it per DataLoader worker).
    """

    def __init__(self, config_str: str, hparams: Optional[Dict[str, Any]] = None,
                 transforms: Optional[List[str]] = None) -> None:
        ra = rand_augment_transform(config_str, dict(hparams or {}), transforms=transforms)
        self.ops = list(ra.ops)
        for op in self.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
        self.num_layers = ra.num_layers
        self.choice_weights = None if ra.choice_weights is None else [float(w) for w in ra.choice_weights]

    def _choose(self) -> list:
        if self.choice_weights is None:
            return random.choices(self.ops, k=self.num_layers)
        # weighted choice without replacement, as timm does for weighted op sets
        pool, weights, chosen = list(self.ops), list(self.choice_weights), []
        for _ in range(min(self.num_layers, len(pool))):
            i = random.choices(range(len(pool)), weights=weights, k=1)[0]
            chosen.append(pool.pop(i))
            weights.pop(i)
        return chosen

    @staticmethod
    def _level_args(op: Any) -> Optional[tuple]:
        """Sample (applied?, level args) exactly like timm's AugmentOp.__call__; None = op skipped."""
        if op.prob < 1.0 and random.random() > op.prob:
            return None
        magnitude = op.magnitude
        if op.magnitude_std > 0:
            if op.magnitude_std == float("inf"):
                magnitude = random.uniform(0, magnitude)
            else:
                magnitude = random.gauss(magnitude, op.magnitude_std)
        upper = op.magnitude_max or 10.0
        magnitude = max(0.0, min(magnitude, upper))
        return op.level_fn(magnitude, op.hparams) if op.level_fn is not None else tuple()

    def __call__(self, img: Image.Image, probs: torch.Tensor, fill: torch.Tensor
                 ) -> Tuple[Image.Image, torch.Tensor]:
        """img: PIL image; probs [U, h, w] map over the same image; fill [U]. Returns both transformed."""
        matrices = []
        for op in self._choose():
            args = self._level_args(op)
            if args is None:
                continue
            if op.name in SPATIAL_OPS:
                matrices.append(spatial_op_matrix(op.name, float(args[0]), img.size[0], img.size[1]))
            img = op.aug_fn(img, *args, **op.kwargs)  # timm's own op on the image
        if matrices:
            probs = affine_dense_map(probs, matrices, img.size[0], img.size[1], fill)
        return img, probs


class TokenLabelTransform:
    """Training transform applied jointly to (PIL image, label map [2, K, H, W], class index).

    Random resized crop -> horizontal flip -> label-aware RandAugment (``auto_augment`` "rand-..."), or
    colour jitter when ``auto_augment`` is None -> ToTensor -> Normalize -> RandomErasing (image only).
    Returns (image [3, S_img, S_img], label map [2, K, label_size, label_size]).
    """

    def __init__(self, input_size: int = 224, label_size: int = 14, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5,
                 auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
                 interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, re_prob: float = 0.25, re_mode: str = "pixel",
                 re_count: int = 1, ra_transforms: Optional[List[str]] = None) -> None:
        self.input_size = int(input_size)
        self.label_size = int(label_size)
        self.hflip = hflip
        self.crop = RandomResizedCropAndInterpolation(self.input_size, scale=scale, ratio=ratio,
                                                      interpolation=interpolation)
        self.rand_augment = None
        self.color_jitter = None
        if auto_augment and auto_augment.lower() != "none":
            if not auto_augment.startswith("rand"):
                raise ValueError(f"token labeling supports RandAugment ('rand-...') or no auto-augment, "
                                 f"got --aa {auto_augment!r}")
            hparams: Dict[str, Any] = dict(translate_const=int(self.input_size * 0.45),
                                           img_mean=tuple(min(255, round(255 * x)) for x in mean))
            if interpolation and interpolation != "random":
                hparams["interpolation"] = str_to_pil_interp(interpolation)
            self.rand_augment = LabelAwareRandAugment(auto_augment, hparams, transforms=ra_transforms)
        elif color_jitter:
            self.color_jitter = T.ColorJitter(*((float(color_jitter),) * 3))
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean=mean, std=std)])
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu") if re_prob > 0 else None

    def __call__(self, img: Image.Image, label_map: torch.Tensor, target: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        k = label_map.shape[1]
        classes, probs = topk_to_dense(label_map, extra_class=target)
        fill = (classes == int(target)).to(probs.dtype)  # one-hot of the image class
        img_w, img_h = img.size
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interp = self.crop.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        img = TF.resized_crop(img, i, j, h, w, [self.input_size, self.input_size], interp)
        probs = crop_dense_map(probs, (i, j, h, w), (img_h, img_w), self.label_size)
        if self.hflip > 0 and random.random() < self.hflip:
            img = TF.hflip(img)
            probs = probs.flip(-1)
        if self.rand_augment is not None:
            img, probs = self.rand_augment(img, probs, fill)
        elif self.color_jitter is not None:
            img = self.color_jitter(img)
        x = self.normalize(img)
        if self.erase is not None:
            x = self.erase(x)
        return x, dense_to_topk(classes, probs, k)


class TokenLabelImageFolder(tv_datasets.ImageFolder):
    """ImageFolder whose items are ``(image, (class index, label map [2, K, S, S]))``.

    The label map of ``<root>/<class>/<name>.<ext>`` is read from ``<label_root>/<class>/<name>.pt``.
    ``transform`` is a joint (img, label_map, target) transform such as :class:`TokenLabelTransform`;
    None returns the PIL image and the raw map.
    """

    def __init__(self, root: str, label_root: str,
                 transform: Optional[Callable[[Image.Image, torch.Tensor, int], Tuple[Any, torch.Tensor]]] = None,
                 loader: Optional[Callable[[str], Any]] = None) -> None:
        kw = {} if loader is None else {"loader": loader}
        super().__init__(root, **kw)
        if not os.path.isdir(label_root):
            raise FileNotFoundError(f"token label directory not found: {label_root}")
        missing = [c for c in self.classes if not os.path.isdir(os.path.join(label_root, c))]
        if missing:
            raise FileNotFoundError(f"token label directory {label_root} has no folder for class(es) "
                                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.label_root = label_root
        self.joint_transform = transform

    def __getitem__(self, index: int) -> Tuple[Any, Tuple[int, torch.Tensor]]:
        path, target = self.samples[index]
        img = self.loader(path)
        label_map = load_label_map(label_path_for(path, self.label_root))
        if self.joint_transform is not None:
            img, label_map = self.joint_transform(img, label_map, target)
        return img, (target, label_map)


class SyntheticTokenLabels(torch.utils.data.Dataset):
    """Wrap a (image, class index) dataset with deterministic synthetic label maps, for smoke tests and
    throughput runs without a label set (e.g. ``--data-set FAKE --token-label``).

    Item i: (image, (target, map [2, k, S, S])) where the map's top-1 class is the image class at every
    location (logit 2 + noise) and the other k - 1 entries are other classes with lower logits; the noise
    depends only on (seed, i). No spatial augmentation is applied to the map.
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
        img, target = self.dataset[index]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s, k, c = self.label_size, self.k, self.num_classes
        # other classes: a random offset per location, so the k - 1 entries differ from target and each other
        offs = torch.stack([torch.randperm(c - 1, generator=g)[:k - 1] + 1 for _ in range(s * s)]) \
            if k > 1 else torch.zeros(s * s, 0, dtype=torch.long)
        idx = torch.cat([torch.zeros(s * s, 1, dtype=torch.long), offs], 1)
        idx = (idx + int(target)) % c
        logits = torch.randn(s * s, k, generator=g) * 0.5 - torch.arange(k, dtype=torch.float32)
        logits[:, 0] += 2.0
        m = torch.stack([logits.T.reshape(k, s, s), idx.T.reshape(k, s, s).float()])
        return img, (int(target), m)


def build_token_label_dataset(root: str, label_root: str, input_size: int = 224, label_size: int = 14, *,
                              auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
                              interpolation: str = "bicubic", re_prob: float = 0.25, re_mode: str = "pixel",
                              re_count: int = 1, scale: Tuple[float, float] = (0.08, 1.0),
                              ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5,
                              mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                              std: Sequence[float] = IMAGENET_DEFAULT_STD,
                              loader: Optional[Callable[[str], Any]] = None) -> TokenLabelImageFolder:
    """Training dataset for token labeling: ImageFolder ``root`` + label maps under ``label_root``.

    Items: (image [3, input_size, input_size], (class index, label map [2, K, label_size, label_size])).
    """
    tf = TokenLabelTransform(input_size, label_size, scale=scale, ratio=ratio, hflip=hflip,
                             auto_augment=auto_augment, color_jitter=color_jitter, interpolation=interpolation,
                             mean=mean, std=std, re_prob=re_prob, re_mode=re_mode, re_count=re_count)
    return TokenLabelImageFolder(root, label_root, tf, loader=loader)


def build_token_label_dataset_from_args(args: Any, root: Optional[str] = None,
                                        loader: Optional[Callable[[str], Any]] = None) -> TokenLabelImageFolder:
    """Build the training set from main.py's args (DeiT flag names).

    Reads args.data_path (root defaults to <data_path>/train), args.token_label_data, args.input_size,
    args.token_label_size, args.aa, args.color_jitter, args.train_interpolation, args.reprob, args.remode,
    args.recount.
    """
    root = root or os.path.join(args.data_path, "train")
    aa = getattr(args, "aa", "rand-m9-mstd0.5-inc1")
    return build_token_label_dataset(
        root, args.token_label_data, args.input_size, getattr(args, "token_label_size", 14),
        auto_augment=None if aa in (None, "", "none") else aa,
        color_jitter=getattr(args, "color_jitter", 0.4) or 0.0,
        interpolation=getattr(args, "train_interpolation", "bicubic"),
        re_prob=getattr(args, "reprob", 0.25), re_mode=getattr(args, "remode", "pixel"),
        re_count=getattr(args, "recount", 1), loader=loader)


# ---- loss ---------------------------------------------------------------------------------------------
def mixtoken_lam(bbox: Optional[Tuple[int, int, int, int]], num_patches: int) -> float:
    """lam = 1 - box area / M for a MixToken box (top, left, bottom, right); 1.0 without a box."""
    if bbox is None:
        return 1.0
    top, left, bottom, right = bbox
    return 1.0 - (bottom - top) * (right - left) / float(num_patches)


def dense_targets(label_map: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[B, 2, K, S, S] top-K maps -> dense soft targets [B, S*S, num_classes] (positions row-major).

    Softmax over the K values, scattered onto their classes, then (1 - eps) * p + eps / C.
    Used by tests/analysis; the loss uses an equivalent gather form that never builds [B, M, C].
    """
    b, _, k, s1, s2 = label_map.shape
    p = label_map[:, 0].float().softmax(1).reshape(b, k, s1 * s2).transpose(1, 2)
    idx = label_map[:, 1].round().long().reshape(b, k, s1 * s2).transpose(1, 2)
    out = torch.zeros(b, s1 * s2, num_classes, dtype=p.dtype, device=p.device)
    out.scatter_add_(2, idx, p)
    return out * (1.0 - smoothing) + smoothing / num_classes


class TokenLabelCrossEntropy(nn.Module):
    """cls_weight * softCE(cls, class target) + dense_weight * softCE(aux, dense targets).

    forward(outputs, targets):
      outputs: ``LVViTDenseOutput`` / tuple (cls [B, C], aux [B, M, C], bbox or None[, mask [B, M] or None]);
      targets: (class target [B] int or [B, C] soft, label map [B, 2, K, S, S] with S*S == M).
    Integer class targets are label-smoothed by ``smoothing``; soft ones are used as given. With a MixToken
    box the class target becomes lam * t + (1 - lam) * t.flip(0), lam = 1 - area / M. Dense targets are
    smoothed by ``smoothing`` and averaged over the positions where ``mask`` is True (all by default).
    """

    def __init__(self, cls_weight: float = 1.0, dense_weight: float = 0.5, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.cls_weight = cls_weight
        self.dense_weight = dense_weight
        self.smoothing = smoothing

    def forward(self, outputs: Union[LVViTDenseOutput, Sequence[Any]],
                targets: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or len(outputs) not in (3, 4):
            raise TypeError("TokenLabelCrossEntropy needs the dense training output (cls, aux, bbox[, mask]); "
                            "build the model with return_dense=True and call it in train mode")
        cls, aux, bbox = outputs[0], outputs[1], outputs[2]
        mask = outputs[3] if len(outputs) == 4 else None
        target, label_map = targets
        target = target.to(cls.device, non_blocking=True)
        b, m, c = aux.shape
        if target.dim() == 1:
            t = F.one_hot(target.long(), c).to(cls.dtype if cls.is_floating_point() else torch.float32)
            t = t * (1.0 - self.smoothing) + self.smoothing / c
        else:
            t = target.to(torch.float32)
        if bbox is not None:
            lam = mixtoken_lam(bbox, m)
            t = lam * t + (1.0 - lam) * t.flip(0)
        loss_cls = torch.sum(-t * F.log_softmax(cls.float(), dim=-1), dim=-1).mean()
        if self.dense_weight == 0:
            return self.cls_weight * loss_cls
        loss_dense = self.dense_loss(aux, label_map, mask)
        return self.cls_weight * loss_cls + self.dense_weight * loss_dense

    def dense_loss(self, aux: torch.Tensor, label_map: torch.Tensor, mask: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """Soft CE of aux [B, M, C] against the smoothed top-K targets of label_map [B, 2, K, S, S]."""
        b, m, c = aux.shape
        if label_map.dim() != 5 or label_map.shape[1] != 2 or label_map.shape[0] != b:
            raise ValueError(f"label map must be [B={b}, 2, K, S, S], got {tuple(label_map.shape)}")
        k, s1, s2 = label_map.shape[2:]
        if s1 * s2 != m:
            raise ValueError(f"label map is {s1}x{s2} but the model has {m} patch positions; "
                             f"set --token-label-size to the patch grid side")
        label_map = label_map.to(aux.device)
        p = label_map[:, 0].float().softmax(1).reshape(b, k, m).transpose(1, 2)  # [B, M, K]
        idx = label_map[:, 1].round().long().reshape(b, k, m).transpose(1, 2)
        if int(idx.max()) >= c or int(idx.min()) < 0:
            raise ValueError(f"label map class index {int(idx.max())} out of range for {c} classes")
        logp = F.log_softmax(aux.float(), dim=-1)  # [B, M, C]
        # soft CE with t = (1 - eps) p + eps / C, without materialising t: gather the K target classes.
        ce = -((1.0 - self.smoothing) * (p * logp.gather(-1, idx)).sum(-1) + self.smoothing / c * logp.sum(-1))
        if mask is None:
            return ce.mean()
        w = mask.to(ce.dtype)
        return (ce * w).sum() / w.sum().clamp_min(1.0)


class TokenLabelCriterion(nn.Module):
    """Engine-facing wrapper: ``criterion(samples, outputs, targets)`` like DeiT's DistillationLoss.

    samples is unused (kept for the common signature); outputs is the model's dense training output;
    targets is the dataset's (class target [B], label map [B, 2, K, S, S]) pair.
    """

    def __init__(self, cls_weight: float = 1.0, dense_weight: float = 0.5, smoothing: float = 0.1) -> None:
        super().__init__()
        self.loss = TokenLabelCrossEntropy(cls_weight, dense_weight, smoothing)

    def forward(self, samples: torch.Tensor, outputs: Any, targets: Tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        return self.loss(outputs, targets)
