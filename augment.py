"""The image transforms of the PIL path (PIL image in, float tensor [3, S, S] out): DeiT's training transform
(timm's create_transform with RandAugment, colour jitter and random erasing; a curriculum's RandAugment
magnitude), the evaluation transform, and DeiT III's 3-Augment and simple random crop. datasets.py re-exports
AugmentConfig and build_transform, where DeiT users look for them.

3-Augment (DeiT III) is a light training augmentation built from torchvision transforms. Pipeline for one
image (S = ``args.input_size``):

1. geometry: random resized crop (scale 0.08-1, bicubic) or, with ``args.src``, a *simple random
   crop* (resize the short side to S, then a random S x S crop from the image padded by 4 px, reflect);
   for S <= 32 the crop is always the padded random crop (resized crops destroy 32 px images);
   then a horizontal flip with p = 0.5;
2. exactly one of grayscale, solarization or gaussian blur, chosen uniformly at random;
3. colour jitter (brightness, contrast, saturation = ``args.color_jitter``) when it is non-zero;
4. ToTensor and ImageNet normalisation.

Random erasing is not part of 3-Augment (DeiT III runs it with ``--reprob 0``), so ``args.reprob``
is ignored here on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from runtime.errors import DataError

__all__ = ["new_data_aug_generator", "simple_random_crop", "posterize_any_bits", "AugmentConfig", "build_transform",
           "build_train_transform", "build_eval_transform", "aa_with_magnitude", "auto_augment_policy"]

DEFAULT_AA = "rand-m9-mstd0.5-inc1"  # DeiT's --aa default


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, also for 0 bits. RandAugment's PosterizeIncreasing asks for 0 bits at magnitude 10
    (reached by m9 + mstd noise); Pillow < 13 then masked every bit, giving a black image, and Pillow >= 13
    raises instead. This gives Pillow 12's result on any Pillow."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def simple_random_crop(size: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> T.Compose:
    """Resize the short side to ``size`` then take a random ``size x size`` crop with 4 px reflect padding."""
    return T.Compose([
        T.Resize(size, interpolation=interpolation),
        T.RandomCrop(size, padding=4, padding_mode="reflect"),
    ])


def _blur_kernel(size: int) -> int:
    # sigma goes up to 2, so a 13-tap kernel holds +-3 sigma; it must stay odd and smaller than the image
    # because torchvision pads with reflection (pad < image side).
    k = 13
    while k >= size and k > 3:
        k -= 2
    return k


def new_data_aug_generator(size: int, src: bool, cj: float) -> Callable:
    """3-Augment at ``size`` px (``src``: DeiT III's simple random crop; ``cj``: colour-jitter strength).

    Returns a callable mapping a PIL image to a normalised float tensor of shape [3, size, size].
    """
    bicubic = InterpolationMode.BICUBIC

    if size <= 32:
        geometry = [T.Resize(size, interpolation=bicubic), T.RandomCrop(size, padding=4)]
    elif src:
        geometry = list(simple_random_crop(size, bicubic).transforms)
    else:
        geometry = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic)]
    geometry.append(T.RandomHorizontalFlip(p=0.5))

    one_of = T.RandomChoice([
        T.RandomGrayscale(p=1.0),
        T.RandomSolarize(threshold=128, p=1.0),
        T.GaussianBlur(kernel_size=_blur_kernel(size), sigma=(0.1, 2.0)),
    ])
    colour = [T.ColorJitter(cj, cj, cj)] if cj else []

    final = [T.ToTensor(), T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)]
    return T.Compose(geometry + [one_of] + colour + final)


# ------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation recipe (DeiT's flags): every field is required, so the command line's defaults are
    the only defaults. ``aa`` None or 'none' disables RandAugment; ``eval_crop_ratio`` is the share of the
    resized short side kept by the eval centre crop."""

    input_size: int
    aa: Optional[str]
    color_jitter: float
    train_interpolation: str
    reprob: float
    remode: str
    recount: int
    three_augment: bool
    simple_random_crop: bool
    eval_crop_ratio: float

    def with_train_stage(self, input_size: int, aa: Optional[str]) -> "AugmentConfig":
        """The same recipe at another training size and RandAugment policy (curriculum phases)."""
        return replace(self, input_size=int(input_size), aa=aa)


def _interp(name: str) -> InterpolationMode:
    name = (name or "bicubic").lower()
    if name == "random":  # timm's 'random' picks per call; for a fixed resize use bicubic
        name = "bicubic"
    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BICUBIC


def _patch_posterize(tf: Any) -> None:
    """Swap the posterize function inside timm RandAugment / AutoAugment / AugMix ops (see above)."""
    for t in getattr(tf, "transforms", [tf]):
        ops = list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:
            ops.extend(sub)
        for op in ops:
            if str(getattr(op, "name", "")).startswith("Posterize") and hasattr(op, "aug_fn"):
                op.aug_fn = posterize_any_bits


def auto_augment_policy(aa: Optional[str]) -> Optional[str]:
    """The --aa policy string, or None when it is empty or 'none'."""
    if aa is None or aa.strip().lower() in ("", "none"):
        return None
    return aa


def aa_with_magnitude(aa: Optional[str], magnitude: int) -> str:
    """A RandAugment policy string at another magnitude: 'rand-m9-mstd0.5-inc1', 3 -> 'rand-m3-mstd0.5-inc1'.
    A policy without an m field gains one; no policy at all means DeiT's default one at ``magnitude``."""
    policy = auto_augment_policy(aa) or DEFAULT_AA
    parts = policy.split("-")
    if parts[0] != "rand":
        raise DataError(f"a curriculum sets the RandAugment magnitude, so --aa must be a rand-... policy, got '{aa}'")
    kept = [p for p in parts[1:] if not (p.startswith("m") and p[1:].isdigit())]
    return "-".join(["rand", f"m{int(magnitude)}"] + kept)


def build_train_transform(aug: AugmentConfig) -> Callable:
    """DeiT training transform: PIL image -> normalised float tensor [3, S, S], S = ``aug.input_size``.

    timm ``create_transform`` (RandAugment, colour jitter, random erasing); for S <= 32 the random resized
    crop becomes resize + 4 px padded random crop; ``simple_random_crop`` swaps in DeiT III's simple crop;
    ``three_augment`` returns DeiT III's 3-Augment.
    """
    size = int(aug.input_size)
    if aug.three_augment:
        return new_data_aug_generator(size, aug.simple_random_crop, aug.color_jitter)
    aa = auto_augment_policy(aug.aa)
    if aug.remode.lower() not in ("pixel", "rand", "const"):
        raise DataError(f"--remode must be pixel, rand or const, got '{aug.remode}'")
    try:
        tf = create_transform(input_size=size, is_training=True, color_jitter=aug.color_jitter, auto_augment=aa,
                              interpolation=aug.train_interpolation, re_prob=float(aug.reprob),
                              re_mode=aug.remode, re_count=int(aug.recount))
    except (AssertionError, KeyError, ValueError) as e:  # timm validates with asserts / dict lookups
        raise DataError(f"bad augmentation setting (--aa '{aa}', --train-interpolation "
                        f"'{aug.train_interpolation}'): {type(e).__name__}: {e}") from None
    _patch_posterize(tf)
    if size <= 32:
        # a resized crop of a 32 px image keeps too little of it; pad-and-crop is the CIFAR standard
        tf.transforms[0] = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC),
                                      T.RandomCrop(size, padding=4)])
    elif aug.simple_random_crop:
        tf.transforms[0] = simple_random_crop(size, _interp(aug.train_interpolation))
    return tf


def build_eval_transform(input_size: int, eval_crop_ratio: float) -> Callable:
    """Resize the short side to int(S / eval_crop_ratio), centre-crop S, normalise; for S <= 32 the image
    is resized to S directly (no margin to crop away at CIFAR scale)."""
    size = int(input_size)
    bicubic = InterpolationMode.BICUBIC
    resize_to = size if size <= 32 else int(size / float(eval_crop_ratio))
    return T.Compose([T.Resize(resize_to, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def build_transform(is_train: bool, aug: AugmentConfig) -> Callable:
    """The train or eval transform of ``aug``."""
    return build_train_transform(aug) if is_train else build_eval_transform(aug.input_size, aug.eval_crop_ratio)
