"""3-Augment (DeiT III): a light training augmentation built from torchvision transforms.

Pipeline for one image (PIL in, float tensor [3, S, S] out, S = ``args.input_size``):

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

from typing import Any, Callable

from PIL import Image, ImageOps
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["new_data_aug_generator", "simple_random_crop", "posterize_any_bits"]


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
