"""The DALI graphs of the DeiT training and evaluation transforms (datasets.build_train_transform /
build_eval_transform, op by op), fed with encoded files and labels by ``fn.external_source``.

Devices: ``device_id=None`` runs every op on the CPU; otherwise JPEGs are decoded by nvJPEG ("mixed") and
the rest runs on the GPU. Outputs: images float [B, 3, S, S] normalised, labels int64 [B]; with ``debug``
the training graph also returns the crop window (anchor, shape in source pixels, HW), the flip flag, and the
RandAugment op index and magnitude bin per layer (randaugment.OP_NAMES; index 15 = layer skipped).

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

MEAN_255 = [255.0 * m for m in IMAGENET_DEFAULT_MEAN]
STD_255 = [255.0 * s for s in IMAGENET_DEFAULT_STD]


@do_not_convert
def _normalize(images):
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255, std=STD_255)


@do_not_convert
def _random_resized_crop(jpegs, size: int, decoder: str, interp):
    """timm's RandomResizedCrop (area 0.08-1, aspect 3/4-4/3, 10 tries) decoded as a region of interest."""
    anchor, shape = fn.random_crop_generator(fn.peek_image_shape(jpegs), random_area=[0.08, 1.0],
                                             random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], num_attempts=10)
    images = fn.decoders.image_slice(jpegs, anchor, shape, axes=[0, 1], device=decoder, output_type=types.RGB)
    return fn.resize(images, size=[size, size], interp_type=interp, antialias=True), anchor, shape


@do_not_convert
def _padded_random_crop(jpegs, size: int, decoder: str, interp):
    """The S <= 32 branch of datasets.build_train_transform: resize the short side to S, then a random S x S
    window of the image padded by 4 zero pixels on each side."""
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=size, interp_type=interp, antialias=True)
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


def supported_policy(aug: Any) -> Optional[randaugment.RandAugmentPolicy]:
    """The RandAugment policy of ``aug`` (None without one); DataError for what the graph does not implement:
    3-Augment, --src, policies other than timm's increasing RandAugment."""
    from runtime.errors import DataError
    import datasets

    if aug.three_augment or aug.simple_random_crop:
        raise DataError("--data-backend dali does not implement --ThreeAugment or --src; use --data-backend pil")
    aa = datasets.auto_augment_policy(aug.aa)
    return randaugment.parse_policy(aa) if aa else None


def build_train_pipeline(aug: Any, batch_size: int, num_threads: int, device_id: Optional[int], seed: int,
                         source: Callable, debug: bool = False, prefetch: int = 2):
    """The training graph of ``aug`` (datasets.AugmentConfig) fed by ``source(batch_info) -> (jpegs, labels)``."""
    policy = supported_policy(aug)
    size = int(aug.input_size)
    interp = types.INTERP_LINEAR if str(aug.train_interpolation).lower() == "bilinear" else types.INTERP_CUBIC
    decoder = "cpu" if device_id is None else "mixed"

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                           dtype=[types.UINT8, types.INT64])
        if size <= 32:
            images, anchor, shape = _padded_random_crop(jpegs, size, decoder, interp)
        else:
            images, anchor, shape = _random_resized_crop(jpegs, size, decoder, interp)
        flip = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        images = fn.flip(images, horizontal=flip)
        ops = bins = types.Constant(np.zeros([0], dtype=np.int32))
        if policy is not None:
            images, ops, bins = randaugment.apply_rand_augment(images, policy, size)
        elif aug.color_jitter and aug.color_jitter > 0:  # timm's create_transform: jitter only without --aa
            images = _color_jitter(images, float(aug.color_jitter))
        outputs = (_normalize(images), labels)
        if debug:
            outputs += (anchor, shape, flip, ops, bins)
        return outputs

    return graph(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, exec_dynamic=True)


def build_eval_pipeline(input_size: int, crop_ratio: float, batch_size: int, num_threads: int,
                        device_id: Optional[int], source: Callable, prefetch: int = 2):
    """datasets.build_eval_transform: bicubic resize of the short side to int(S / crop_ratio) (S when
    S <= 32) with torchvision's long-side rounding (int), centre crop S x S, normalise."""
    size = int(input_size)
    short = size if size <= 32 else int(size / float(crop_ratio))
    decoder = "cpu" if device_id is None else "mixed"

    @pipeline_def
    def graph():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                           dtype=[types.UINT8, types.INT64])
        hw = fn.cast(fn.slice(fn.peek_image_shape(jpegs), 0, 2, axes=[0]), dtype=types.FLOAT)
        # torchvision: the short side becomes `short`, the long one int(short * long / short_side)
        scaled = dmath.floor(hw * (short / dmath.min(hw[0], hw[1])) + 1e-4)
        target = dmath.max(scaled, types.Constant(np.float32(short)))
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        images = fn.resize(images, size=target, interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop_mirror_normalize(images, crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5,
                                          dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255, std=STD_255)
        return images, labels

    return graph(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=0,
                 prefetch_queue_depth=prefetch, exec_dynamic=True)
