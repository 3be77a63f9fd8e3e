"""timm's RandAugment ('rand-m9-mstd0.5-inc1', DeiT's default) as a DALI graph.

Built with DALI's custom-augmentation API (``@augmentation`` with ``mag_range``), op for op as timm's
``rand_augment_transform``: the 15 "increasing" ops, ``n`` layers per image (ops drawn uniformly with
replacement), each layer applied with probability ``p``, and a per-layer magnitude level
``clip(N(m, mstd), 0, mmax)``. DALI indexes magnitudes by an integer bin, so the level is rounded to
``1 / LEVEL_STEPS`` (0.1 with 10 steps per level unit); timm keeps it continuous.

Where an op cannot be computed exactly as PIL does it (README, "DALI backend"):
- geometric ops (Rotate, ShearX/Y, TranslateX/YRel) interpolate bilinearly: DALI's ``warp_affine`` has no
  bicubic mode. The mean-colour fill is exact (the warp runs on ``image - fill`` with fill 0);
- Equalize follows OpenCV's lookup table, PIL rounds its steps slightly differently;
- Sharpness smooths the one-pixel border too (PIL keeps it).
All ops run per sample, on the pipeline's device ("cpu" or "gpu").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import do_not_convert
import nvidia.dali.math as dmath
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin

from runtime.errors import DataError

LEVEL_STEPS = 10  # magnitude bins per level unit: bin b is level b / LEVEL_STEPS
IMAGENET_MEAN_RGB = (124, 116, 104)  # timm's RandAugment fill: round(IMAGENET_DEFAULT_MEAN * 255)

# timm's _RAND_INCREASING_TRANSFORMS, in its order; index len(OP_NAMES) is "layer skipped"
OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
            "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


_WARPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed timm 'rand-...' policy: magnitude m, layers n, layer probability p, noise std, level cap."""

    magnitude: float
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0


def parse_policy(aa: str) -> RandAugmentPolicy:
    """'rand-m9-mstd0.5-inc1' -> RandAugmentPolicy (timm's keys m, n, p, mstd, mmax, inc). Other policy kinds,
    the non-increasing op set (inc0) and weighted op choice are refused with one line."""
    parts = aa.split("-")
    if parts[0] != "rand":
        raise DataError(f"--data-backend dali supports RandAugment ('rand-...') policies only, got --aa '{aa}'")
    values: Dict[str, float] = {"m": 10.0, "n": 2, "p": 0.5, "mstd": 0.0, "mmax": 10.0, "inc": 0}
    for part in parts[1:]:
        key = next((k for k in ("mstd", "mmax", "inc", "m", "n", "p") if part.startswith(k)), "")
        try:
            values[key] = float(part[len(key):]) if key else float("nan")
        except ValueError:
            key = ""
        if not key:
            raise DataError(f"--data-backend dali cannot read the section '{part}' of --aa '{aa}'")
    if not values["inc"]:
        raise DataError(f"--data-backend dali implements the increasing op set (inc1) only, got --aa '{aa}'")
    std = float("inf") if values["mstd"] > 100 else values["mstd"]
    return RandAugmentPolicy(values["m"], int(values["n"]), values["p"], std, values["mmax"])


# ------------------------------------------------------------------------------------------------ helpers
@do_not_convert
def _to_uint8(x):
    return fn.cast(dmath.clamp(x, 0.0, 255.0), dtype=types.UINT8)


@do_not_convert
def _floor_u8(x):
    """PIL's lookup tables truncate: floor, then clamp to a byte."""
    return _to_uint8(dmath.floor(x))


@do_not_convert
def _blend(degenerate, image, factor):
    """PIL ``Image.blend(degenerate, image, factor)``: degenerate + factor * (image - degenerate), clipped."""
    d = fn.cast(degenerate, dtype=types.FLOAT)
    return _floor_u8(d + factor * (fn.cast(image, dtype=types.FLOAT) - d))


@do_not_convert
def _luma(image):
    """PIL's convert('L'): 0.299 R + 0.587 G + 0.114 B, rounded (as a float HW1 tensor)."""
    rgb = fn.cast(image, dtype=types.FLOAT)
    weights = types.Constant(np.array([0.299, 0.587, 0.114], dtype=np.float32))
    return dmath.floor(fn.reductions.sum(rgb * weights, axes=[2], keep_dims=True) + 0.5)


@do_not_convert
def _warp(image, matrix):
    """PIL ``Image.transform(AFFINE, matrix, fillcolor=mean)``: ``matrix`` maps output to input pixel centres.
    The warp runs on image - mean with fill 0, so the fill is the per-channel mean (DALI fills with a scalar)."""
    mean = types.Constant(np.array(IMAGENET_MEAN_RGB, dtype=np.float32))
    shifted = fn.cast(image, dtype=types.FLOAT) - mean
    warped = fn.warp_affine(shifted, matrix=matrix, fill_value=0.0, interp_type=types.INTERP_LINEAR,
                            inverse_map=True)
    return _to_uint8(dmath.floor(warped + mean + 0.5))


def _rotation_matrix(degrees: float, size: int) -> np.ndarray:
    """PIL's ``Image.rotate`` inverse map for a size x size image (counter-clockwise, about the centre)."""
    a = -math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    centre = size / 2.0
    return np.array([[c, s, centre - c * centre - s * centre], [-s, c, centre + s * centre - c * centre]],
                    dtype=np.float32)


def _affine(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f]], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- ops
@do_not_convert
def _point_ops() -> List[Any]:
    """Ops without geometry or blending: AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd,
    and the identity of a skipped layer."""

    @augmentation
    @do_not_convert
    def auto_contrast(data, _=None):
        lo = fn.cast(fn.reductions.min(data, axes=[0, 1]), dtype=types.FLOAT)
        hi = fn.cast(fn.reductions.max(data, axes=[0, 1]), dtype=types.FLOAT)
        flat = hi <= lo  # PIL leaves a constant channel unchanged
        scale = 255.0 / (hi - lo + flat) * (1.0 - flat) + flat
        offset = -lo * scale * (1.0 - flat)
        return _floor_u8(fn.cast(data, dtype=types.FLOAT) * scale + offset)

    @augmentation
    @do_not_convert
    def equalize(data, _=None):
        return fn.equalize(data)

    @augmentation
    @do_not_convert
    def invert(data, _=None):
        return _to_uint8(255.0 - fn.cast(data, dtype=types.FLOAT))

    @do_not_convert
    def posterize_mask(level: float) -> np.ndarray:
        bits = 4 - int(level / 10 * 4)
        return np.array((0xFF << (8 - bits)) & 0xFF if bits > 0 else 0, dtype=np.uint8)

    @augmentation(mag_range=(0, 10), mag_to_param=posterize_mask)
    @do_not_convert
    def posterize(data, mask):
        return data & mask

    @augmentation(mag_range=(0, 10),
                  mag_to_param=do_not_convert(lambda level: np.float32(256 - int(level / 10 * 256))))
    @do_not_convert
    def solarize(data, threshold):
        x = fn.cast(data, dtype=types.FLOAT)
        return _to_uint8(x + (x >= threshold) * (255.0 - 2.0 * x))

    @augmentation(mag_range=(0, 10),
                  mag_to_param=do_not_convert(lambda level: np.float32(min(128, int(level / 10 * 110)))))
    @do_not_convert
    def solarize_add(data, add):
        x = fn.cast(data, dtype=types.FLOAT)
        return _to_uint8(x + (x < 128.0) * add)

    @augmentation
    @do_not_convert
    def identity(data, _=None):
        return data

    return [auto_contrast, equalize, invert, posterize, solarize, solarize_add, identity]


@do_not_convert
def _enhance_ops() -> List[Any]:
    """PIL's ImageEnhance blends at factor 1 +- 0.9 level / 10: Color, Contrast, Brightness, Sharpness."""

    @do_not_convert
    def enhance(level: float) -> np.ndarray:
        return np.float32(max(0.1, 1.0 + level / 10 * 0.9))  # the sign is applied before: level may be < 0

    @augmentation(mag_range=(0, 10), randomly_negate=True, mag_to_param=enhance)
    @do_not_convert
    def color(data, factor):
        return _blend(_luma(data), data, factor)

    @augmentation(mag_range=(0, 10), randomly_negate=True, mag_to_param=enhance)
    @do_not_convert
    def contrast(data, factor):
        mean = dmath.floor(fn.reductions.mean(_luma(data)) + 0.5)
        return _blend(mean, data, factor)

    @augmentation(mag_range=(0, 10), randomly_negate=True, mag_to_param=enhance)
    @do_not_convert
    def brightness(data, factor):
        return _floor_u8(fn.cast(data, dtype=types.FLOAT) * factor)

    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0  # PIL's ImageFilter.SMOOTH

    @augmentation(mag_range=(0, 10), randomly_negate=True, mag_to_param=enhance)
    @do_not_convert
    def sharpness(data, factor):
        smoothed = fn.filter(data, smooth, border="clamp")
        return _blend(smoothed, data, factor)

    return [color, contrast, brightness, sharpness]


@do_not_convert
def _geometric_ops(size: int) -> List[Any]:
    """Rotate, ShearX/Y, TranslateX/YRel (relative to the side ``size``), as PIL affine inverse maps."""

    @augmentation(mag_range=(0, 10), randomly_negate=True,
                  mag_to_param=do_not_convert(lambda level: _rotation_matrix(level / 10 * 30.0, size)))
    @do_not_convert
    def rotate(data, matrix):
        return _warp(data, matrix)

    @augmentation(mag_range=(0, 10), randomly_negate=True,
                  mag_to_param=do_not_convert(lambda level: _affine(1, level / 10 * 0.3, 0, 0, 1, 0)))
    @do_not_convert
    def shear_x(data, matrix):
        return _warp(data, matrix)

    @augmentation(mag_range=(0, 10), randomly_negate=True,
                  mag_to_param=do_not_convert(lambda level: _affine(1, 0, 0, level / 10 * 0.3, 1, 0)))
    @do_not_convert
    def shear_y(data, matrix):
        return _warp(data, matrix)

    @augmentation(mag_range=(0, 10), randomly_negate=True,
                  mag_to_param=do_not_convert(lambda level: _affine(1, 0, level / 10 * 0.45 * size, 0, 1, 0)))
    @do_not_convert
    def translate_x(data, matrix):
        return _warp(data, matrix)

    @augmentation(mag_range=(0, 10), randomly_negate=True,
                  mag_to_param=do_not_convert(lambda level: _affine(1, 0, 0, 0, 1, level / 10 * 0.45 * size)))
    @do_not_convert
    def translate_y(data, matrix):
        return _warp(data, matrix)

    return [rotate, shear_x, shear_y, translate_x, translate_y]


@do_not_convert
def build_ops(size: int) -> List[Any]:
    """The 15 ops for size x size images in timm's order (OP_NAMES), plus identity last. Magnitudes are
    timm's levels 0..10; each op's ``mag_range`` / ``mag_to_param`` maps them to its argument as timm does."""
    by_name = {op.name: op for op in _point_ops() + _enhance_ops() + _geometric_ops(size)}
    order = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
             "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "identity")
    return [by_name[name] for name in order]


@do_not_convert
def _unconverted(ops: List[Any]) -> List[Any]:
    def wrap(op):
        @do_not_convert
        def call(data, **kwargs):
            return op(data, **kwargs)
        return call
    return [wrap(op) for op in ops]


@do_not_convert
def _level_bins(policy: RandAugmentPolicy, shape: Tuple[int, ...]):
    """Per-sample magnitude bins: timm's clip(N(m, std), 0, mmax) (uniform(0, m) for an infinite std),
    rounded to 1 / LEVEL_STEPS of a level."""
    if math.isinf(policy.magnitude_std):
        level = fn.random.uniform(range=[0.0, policy.magnitude], shape=shape)
    elif policy.magnitude_std > 0:
        level = fn.random.normal(mean=policy.magnitude, stddev=policy.magnitude_std, shape=shape)
    else:
        level = types.Constant(np.full(shape, policy.magnitude, dtype=np.float32))
    level = dmath.clamp(level, 0.0, float(policy.magnitude_max))
    return fn.cast(dmath.floor(level * LEVEL_STEPS + 0.5), dtype=types.INT32)


def apply_rand_augment(images, policy: RandAugmentPolicy, size: int) -> Tuple[Any, Any, Any]:
    """RandAugment on a batch of HWC uint8 size x size images. Returns (images, op index per layer
    [n] (len(OP_NAMES) = skipped), magnitude bin per layer [n]); the last two are the debug record."""
    ops = build_ops(size)
    n = policy.num_layers
    shape = (n,)
    op_idx = fn.random.uniform(values=list(range(len(OP_NAMES))), shape=shape, dtype=types.INT32)
    applied = fn.random.coin_flip(probability=policy.prob, shape=shape, dtype=types.INT32)
    chosen = op_idx * applied + len(OP_NAMES) * (1 - applied)
    bins = _level_bins(policy, shape)
    mag = signed_bin(bins, shape=shape)
    num_bins = int(round(policy.magnitude_max * LEVEL_STEPS)) + 1
    # bins span levels 0..mmax; warp matrices must stay on the CPU (argument inputs), the rest follow the data
    scaled_ops = [op.augmentation(mag_range=(0, policy.magnitude_max),
                                  param_device="cpu" if op.name in _WARPS else "auto")
                  if op.mag_range is not None else op for op in ops]
    # AutoGraph would re-convert DALI's parameter tables on every call (tens of seconds per build); the ops
    # have no data-dependent Python branches, so they are called unconverted inside select's branches
    plain_ops = _unconverted(scaled_ops)
    for layer in range(n):
        images = select(plain_ops, chosen[layer], images, magnitude_bin=mag[layer], num_magnitude_bins=num_bins)
    return images, chosen, bins
