"""The DALI graphs of the DeiT training and evaluation transforms (datasets.build_train_transform /
build_eval_transform, op by op), fed with encoded files and labels by ``fn.external_source``.

Devices: ``device_id=None`` runs every op on the CPU; otherwise JPEGs are decoded by nvJPEG ("mixed") and
the rest runs on the GPU. Outputs: images float [B, 3, S, S] normalised, labels int64 [B]; with ``debug``
the training graph also returns the crop window (anchor, shape in source pixels, HW), the flip flag, and the
RandAugment op index and magnitude bin per layer (randaugment.OP_NAMES; index 15 = layer skipped).

Decoding as PIL does: EXIF orientation is ignored (``adjust_orientation=False``; PIL's ``Image.open`` never
applies it) and nvJPEG upsamples chroma with libjpeg's "fancy" filter (``jpeg_fancy_upsampling``).

Random erasing is not here: it runs on the batch after the pipeline, with timm's own RandomErasing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import do_not_convert
import nvidia.dali.math as dmath
from nvidia.dali.auto_aug.core import select
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dali_loader import randaugment
from runtime.errors import DataError

# --train-interpolation: timm's names (timm.data.transforms) that DALI's resize has a filter for; 'random' is
# timm's per-sample choice between bilinear and bicubic (RandomResizedCropAndInterpolation)
INTERPOLATIONS = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN,
                  "lanczos": types.INTERP_LANCZOS3}
RANDOM_INTERPOLATIONS = (types.INTERP_LINEAR, types.INTERP_CUBIC)
NO_DALI_FILTER = ("box", "hamming")  # timm's other names: PIL filters DALI's resize lacks
REMODES = ("pixel", "rand", "const")  # datasets.build_train_transform's check of --remode

MEAN_255 = [255.0 * m for m in IMAGENET_DEFAULT_MEAN]
STD_255 = [255.0 * s for s in IMAGENET_DEFAULT_STD]


@do_not_convert
def _normalize(images):
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255, std=STD_255)


# PIL's decode: stored orientation (no EXIF rotation), libjpeg's fancy chroma upsampling (the CPU decoder's
# default, an option of nvJPEG's)
_AS_PIL = dict(output_type=types.RGB, adjust_orientation=False, jpeg_fancy_upsampling=True)


@do_not_convert
def _image_hw(jpegs):
    """(H, W) of each encoded image as stored, as float [2]."""
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
    return fn.cast(fn.slice(shape, 0, 2, axes=[0]), dtype=types.FLOAT)


@do_not_convert
def crop_window(jpegs):
    """timm's RandomResizedCrop window (area 0.08-1, aspect 3/4-4/3, 10 tries): (anchor, shape), HW pixels."""
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
    return fn.random_crop_generator(shape, random_area=[0.08, 1.0], random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0],
                                    num_attempts=10)


@do_not_convert
def _random_resized_crop(jpegs, size: int, decoder: str, interp):
    """timm's RandomResizedCrop decoded as a region of interest (DALI decodes only the window where its
    decoder can, else the whole image, then crops: the same pixels either way)."""
    anchor, shape = crop_window(jpegs)
    images = fn.decoders.image_slice(jpegs, anchor, shape, axes=[0, 1], device=decoder, **_AS_PIL)
    return fn.resize(images, size=[size, size], interp_type=interp, antialias=True), anchor, shape


@do_not_convert
def _padded_random_crop(jpegs, size: int, decoder: str):
    """The S <= 32 branch of datasets.build_train_transform: resize the short side to S (bicubic, whatever
    --train-interpolation says, as that branch does), then a random S x S window of the image padded by 4
    zero pixels on each side."""
    images = fn.decoders.image(jpegs, device=decoder, **_AS_PIL)
    images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_CUBIC, antialias=True)
    hw = fn.cast(fn.slice(images.shape(), 0, 2, axes=[0]), dtype=types.FLOAT)
    room = hw + 8.0 - size  # window positions in the padded image: 0..room
    pick = fn.random.uniform(range=[0.0, 1.0], shape=[2])
    start = fn.cast(dmath.floor(pick * (room + 1.0)), dtype=types.INT32) - 4
    images = fn.slice(images, start, types.Constant(np.array([size, size], dtype=np.int32)), axes=[0, 1],
                      out_of_bounds_policy="pad", fill_values=0)
    return images, start, fn.cast(hw, dtype=types.INT32)


def _color_jitter(images, strength: float):
    """torchvision ColorJitter(b, c, s = strength) on PIL images: factors U[1 - s, 1 + s] (>= 0), applied
    in a random order (brightness, contrast and saturation are ImageEnhance's blends)."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = [fn.random.uniform(range=[lo, hi]) for _ in range(3)]
    steps: list[Callable] = [
        lambda x, f: randaugment._floor_u8(fn.cast(x, dtype=types.FLOAT) * f),
        lambda x, f: randaugment._blend(dmath.floor(fn.reductions.mean(randaugment._luma(x)) + 0.5), x, f),
        lambda x, f: randaugment._blend(randaugment._luma(x), x, f),
    ]
    orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]

    def in_order(order):
        def run(x, f0, f1, f2):
            f = (f0, f1, f2)
            for k in order:
                x = steps[k](x, f[k])
            return x
        return run

    which = fn.random.uniform(values=list(range(len(orders))), dtype=types.INT32)
    return select([in_order(o) for o in orders], which, images, *factors)


def train_interpolation(name: str):
    """--train-interpolation -> DALI's filter, or None for 'random' (bilinear or bicubic per sample). Names are
    timm's, spelt as timm spells them (the PIL path refuses others too); DataError for the rest."""
    if name == "random":
        return None
    if name in INTERPOLATIONS:
        return INTERPOLATIONS[name]
    if name in NO_DALI_FILTER:
        raise DataError(f"--data-backend dali has no '{name}' filter (DALI's resize lacks it); use "
                        f"--data-backend pil or --train-interpolation {', '.join(['random', *INTERPOLATIONS])}")
    names = ", ".join(["random", *INTERPOLATIONS, *NO_DALI_FILTER])
    raise DataError(f"--train-interpolation must be one of {names} (timm's names), got '{name}'")


def check_augment(aug: Any) -> Optional[randaugment.RandAugmentPolicy]:
    """The RandAugment policy of ``aug`` (None without one); DataError for what the graph does not implement
    (3-Augment, --src, policies other than timm's increasing RandAugment, box/hamming filters) and for the
    --remode and --train-interpolation values the PIL path refuses too."""
    import datasets

    if aug.three_augment or aug.simple_random_crop:
        raise DataError("--data-backend dali does not implement --ThreeAugment or --src; use --data-backend pil")
    if str(aug.remode).lower() not in REMODES:
        raise DataError(f"--remode must be pixel, rand or const, got '{aug.remode}'")
    train_interpolation(aug.train_interpolation)
    aa = datasets.auto_augment_policy(aug.aa)
    return randaugment.parse_policy(aa) if aa else None


@do_not_convert
def _crop_filter(interp):
    """The resize filter per sample: ``interp``, or for None timm's 'random' draw; (filter, its int32 code)."""
    if interp is not None:
        return interp, types.Constant(np.int32(int(interp)))
    code = fn.random.uniform(values=[int(f) for f in RANDOM_INTERPOLATIONS], dtype=types.INT32)
    return fn.cast(code, dtype=types.INTERP_TYPE), code


def build_train_pipeline(aug: Any, batch_size: int, num_threads: int, device_id: Optional[int], seed: int,
                         source: Callable, debug: bool = False, prefetch: int = 2):
    """The training graph of ``aug`` (datasets.AugmentConfig) fed by ``source(batch_info) -> (jpegs, labels)``.
    ``debug`` adds (crop anchor, crop shape, flip, RandAugment ops, magnitude bins, resize filter code)."""
    policy = check_augment(aug)
    size = int(aug.input_size)
    interp = train_interpolation(aug.train_interpolation)
    decoder = "cpu" if device_id is None else "mixed"

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                           dtype=[types.UINT8, types.INT64])
        if size <= 32:
            images, anchor, shape = _padded_random_crop(jpegs, size, decoder)
            code = types.Constant(np.int32(int(types.INTERP_CUBIC)))
        else:
            crop_filter, code = _crop_filter(interp)
            images, anchor, shape = _random_resized_crop(jpegs, size, decoder, crop_filter)
        flip = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        images = fn.flip(images, horizontal=flip)
        ops = bins = types.Constant(np.zeros([0], dtype=np.int32))
        if policy is not None:
            images, ops, bins = randaugment.apply_rand_augment(images, policy, size)
        elif aug.color_jitter and aug.color_jitter > 0:  # timm's create_transform: jitter only without --aa
            images = _color_jitter(images, float(aug.color_jitter))
        outputs = (_normalize(images), labels)
        if debug:
            outputs += (anchor, shape, flip, ops, bins, code)
        return outputs

    return graph(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, exec_dynamic=True)


@do_not_convert
def _centre_start(hw, size: int):
    """torchvision's CenterCrop offset, int(round(margin / 2)) with Python's round (half to even): an odd
    margin of 2k + 1 starts at k or k + 1, whichever is even (DALI's crop_pos 0.5 did not match it: one pixel
    off, 19 levels on an 80 x 48 file at 40 px)."""
    half = (hw - float(size)) * 0.5
    low = dmath.floor(half)
    odd_low = low - 2.0 * dmath.floor(low * 0.5)  # 1 where floor(half) is odd
    return fn.cast(low + (half > low) * odd_low, dtype=types.INT32)


def build_eval_pipeline(input_size: int, crop_ratio: float, batch_size: int, num_threads: int,
                        device_id: Optional[int], source: Callable, prefetch: int = 2):
    """datasets.build_eval_transform: bicubic resize of the short side to int(S / crop_ratio) (S when
    S <= 32) with torchvision's long-side rounding (int), centre crop S x S at torchvision's offset, normalise."""
    size = int(input_size)
    short = size if size <= 32 else int(size / float(crop_ratio))
    decoder = "cpu" if device_id is None else "mixed"

    @pipeline_def
    def graph():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                           dtype=[types.UINT8, types.INT64])
        hw = _image_hw(jpegs)
        # torchvision: the short side becomes `short`, the long one int(short * long / short_side)
        scaled = dmath.floor(hw * (short / dmath.min(hw[0], hw[1])) + 1e-4)
        target = dmath.max(scaled, types.Constant(np.float32(short)))
        images = fn.decoders.image(jpegs, device=decoder, **_AS_PIL)
        images = fn.resize(images, size=target, interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.slice(images, _centre_start(target, size), types.Constant(np.array([size, size], np.int32)),
                          axes=[0, 1])
        return _normalize(images), labels

    return graph(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=0,
                 prefetch_queue_depth=prefetch, exec_dynamic=True)
