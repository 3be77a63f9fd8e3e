"""The input-size / augmentation curriculum of EfficientTrain (Wang et al., ICCV 2023), which the ToE paper
combines with Token Expansion in Table 4.

A curriculum splits training into phases. Each phase starts at an epoch and fixes the training input size
and the RandAugment magnitude m (timm's ``rand-m{m}-mstd0.5-inc1``); evaluation always runs at the final
size. ToE's stages (``toe.Schedule``) run on top of it, independently: phases and stages interleave.

EfficientTrain's published table: five equal phases; sizes 5/7, 5/7, 5/7, 6/7 and 7/7 of the final size
(160, 160, 160, 192, 224 for 224); magnitudes 1, 3, 5, 7, 9.

How an image reaches the phase size is the curriculum's ``downsample``: ``"fourier"`` (EfficientTrain's own
method: augment at the final size, then keep the lowest frequencies on the device with
:func:`frequency_crop`) or ``"resize"`` (the loader crops and resizes straight to the phase size).

Like ``toe.Schedule`` the tables need no torch; :func:`frequency_crop` imports it on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

__all__ = ["Phase", "Curriculum", "EFFICIENTTRAIN_SIZES", "EFFICIENTTRAIN_MAGNITUDES", "DOWNSAMPLE_MODES",
           "frequency_crop"]

# EfficientTrain's phases as (numerator, denominator) fractions of the final size, and the magnitudes.
EFFICIENTTRAIN_SIZES: Tuple[Tuple[int, int], ...] = ((5, 7), (5, 7), (5, 7), (6, 7), (7, 7))
EFFICIENTTRAIN_MAGNITUDES: Tuple[int, ...] = (1, 3, 5, 7, 9)
# how a phase's images reach its size (see the module docstring); the first is the default
DOWNSAMPLE_MODES: Tuple[str, ...] = ("fourier", "resize")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Phase:
    """One curriculum phase: from ``start_epoch`` (0-based) on, train at ``input_size`` x ``input_size``
    pixels with RandAugment magnitude ``magnitude``."""

    start_epoch: int
    input_size: int
    magnitude: int


@dataclass(frozen=True)
class Curriculum:
    """Training phases of an input-size / RandAugment curriculum (EfficientTrain).

    Args:
        phases: the phases in order; the first starts at epoch 0, starts strictly increase, and the last
            phase lasts until the end of training.
        patch_size: every input size must be a multiple of it (a ViT sees whole patches only).
        downsample: ``"fourier"`` (the loader yields final-size images, :func:`frequency_crop` reduces them
            on the device, which needs even phase sizes: see :meth:`odd_sizes`) or ``"resize"`` (the loader
            yields phase-size images). It does not change the table or any lookup.

    Raises ValueError naming ``phases``, ``patch_size`` or ``downsample`` when the table is not valid.
    """

    phases: Tuple[Phase, ...]
    patch_size: int = 1
    downsample: str = DOWNSAMPLE_MODES[0]

    def __post_init__(self) -> None:
        if not _is_int(self.patch_size) or self.patch_size < 1:
            raise ValueError(f"patch_size must be an integer >= 1, got {self.patch_size!r}")
        phases = tuple(self.phases)
        if not phases or not all(isinstance(p, Phase) for p in phases):
            raise ValueError(f"phases must be a non-empty sequence of Phase, got {self.phases!r}")
        for p in phases:
            if not (_is_int(p.start_epoch) and _is_int(p.input_size) and _is_int(p.magnitude)):
                raise ValueError(f"phases: start epoch, input size and magnitude must be integers, got {p}")
            if p.input_size < 1 or p.input_size % self.patch_size:
                raise ValueError(f"phases: input size {p.input_size} is not a positive multiple of "
                                 f"patch_size {self.patch_size}")
            if p.magnitude < 0:
                raise ValueError(f"phases: RandAugment magnitude must be >= 0, got {p.magnitude}")
        starts = [p.start_epoch for p in phases]
        if starts[0] != 0:
            raise ValueError(f"phases must start at epoch 0, got starts {starts}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phases must start at strictly increasing epochs, got starts {starts}")
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {', '.join(DOWNSAMPLE_MODES)}, got {self.downsample!r}")
        object.__setattr__(self, "phases", phases)

    # ------------------------------------------------------------------------------------- constructors
    @classmethod
    def efficienttrain(cls, epochs: int, final_size: int, patch_size: int) -> "Curriculum":
        """EfficientTrain's table scaled to ``epochs`` and ``final_size``.

        Phase i (0-based, of 5) holds the epochs e with floor(5 e / epochs) == i, so it starts at
        ceil(i * epochs / 5), the same integer split as ``Schedule.stage_starts`` (0/60/120/180/240 for 300
        epochs). With fewer than 5 epochs the phases that would hold no epoch are left out (1 epoch: only the
        first). Its size is the multiple of ``patch_size`` nearest to final_size x (5/7, 5/7, 5/7, 6/7, 1),
        ties rounding up: 224 with patch 16 gives 160, 160, 160, 192, 224 (exact sevenths); 64 with patch 8
        gives 48, 48, 48, 56, 64 (45.7 -> 48, 54.9 -> 56). Magnitudes are 1, 3, 5, 7, 9.

        Raises ValueError naming the argument: any of them not a positive integer, or ``final_size`` not a
        multiple of ``patch_size``.
        """
        num = len(EFFICIENTTRAIN_SIZES)
        for name, value in (("epochs", epochs), ("final_size", final_size), ("patch_size", patch_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if final_size % patch_size:
            raise ValueError(f"final_size {final_size} must be a multiple of patch_size {patch_size}")
        starts = [-(-(i * epochs) // num) for i in range(num)] + [epochs]
        phases = []
        for i, ((top, bottom), magnitude) in enumerate(zip(EFFICIENTTRAIN_SIZES, EFFICIENTTRAIN_MAGNITUDES)):
            if starts[i + 1] == starts[i]:
                continue  # no epoch e has floor(5 e / epochs) == i
            # round(final * top / (bottom * patch)) in integers, half up; at least one patch
            patches = max(1, (2 * final_size * top + bottom * patch_size) // (2 * bottom * patch_size))
            phases.append(Phase(starts[i], patches * patch_size, magnitude))
        return cls(tuple(phases), patch_size)

    @classmethod
    def parse(cls, table: str, patch_size: int = 1) -> "Curriculum":
        """A user table ``"start:size:magnitude,..."``, e.g. ``"0:160:1,60:160:3,120:160:5,180:192:7,240:224:9"``
        (EfficientTrain at 300 epochs, 224 px). Sizes are taken as written (no rounding) and must be
        multiples of ``patch_size``. Raises ValueError naming ``table`` on any malformed entry."""
        if not _is_int(patch_size) or patch_size < 1:
            raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")
        if not isinstance(table, str) or not table.strip():
            raise ValueError(f"table must be a non-empty string 'start:size:magnitude,...', got {table!r}")
        phases = []
        for entry in table.split(","):
            fields = entry.strip().split(":")
            try:
                if len(fields) != 3:
                    raise ValueError
                start, size, magnitude = (int(f) for f in fields)
            except ValueError:
                raise ValueError(f"table entry {entry.strip()!r} is not start:size:magnitude (three integers), "
                                 f"in table {table!r}") from None
            phases.append(Phase(start, size, magnitude))
        try:
            return cls(tuple(phases), patch_size)
        except ValueError as err:
            raise ValueError(f"table {table!r}: {err}") from None

    # ---------------------------------------------------------------------------------------- lookups
    def phase(self, epoch: int) -> int:
        """1-based index of the phase in force at the 0-based ``epoch`` (like ``Schedule.stage``)."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        return sum(1 for p in self.phases if epoch >= p.start_epoch)

    def input_size(self, epoch: int) -> int:
        """Training input size (pixels per side) at ``epoch``."""
        return self.phases[self.phase(epoch) - 1].input_size

    def magnitude(self, epoch: int) -> int:
        """RandAugment magnitude m at ``epoch``."""
        return self.phases[self.phase(epoch) - 1].magnitude

    def rand_augment(self, epoch: int, policy: str = "rand-m{m}-mstd0.5-inc1") -> str:
        """timm RandAugment policy string of ``epoch``: ``policy`` with {m} replaced by the magnitude."""
        return policy.format(m=self.magnitude(epoch))

    def phase_starts(self) -> Sequence[int]:
        """0-based first epoch of each phase."""
        return [p.start_epoch for p in self.phases]

    def phase_lengths(self, epochs: int) -> Sequence[int]:
        """Epochs spent in each phase when training lasts ``epochs`` (0 for phases starting at or after it)."""
        if not _is_int(epochs) or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        ends = [p.start_epoch for p in self.phases[1:]] + [epochs]
        return [max(0, min(end, epochs) - p.start_epoch) for p, end in zip(self.phases, ends)]

    def odd_sizes(self) -> Sequence[int]:
        """Phase sizes :func:`frequency_crop` cannot produce (it keeps size // 2 frequencies each way)."""
        return sorted({p.input_size for p in self.phases if p.input_size % 2})

    def to_table(self) -> str:
        """The ``start:size:magnitude,...`` form that :meth:`parse` reads."""
        return ",".join(f"{p.start_epoch}:{p.input_size}:{p.magnitude}" for p in self.phases)


def frequency_crop(images: "torch.Tensor", size: int) -> "torch.Tensor":
    """EfficientTrain's low-pass down-sampling: ``[B, C, H, H]`` -> ``[B, C, size, size]``.

    Keeps the ``size x size`` lowest spatial frequencies of each image: in the unshifted 2-D spectrum these
    are the four corner blocks of ``size // 2`` rows and columns (frequencies -size/2 .. size/2 - 1 each
    way). They are scaled by ``(size / H)^2`` (the ratio of the two inverse-FFT normalisations, so a
    constant image keeps its value) and transformed back; the real part is returned, in fp32 for
    half-precision input.

    Args:
        images: ``[B, C, H, H]`` real images (square).
        size: even output side, 2 <= size <= H.

    Raises ValueError naming ``images`` or ``size`` when the shapes do not fit.
    """
    import torch

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, C, H, H] tensor (square), got {shape}")
    side = images.shape[-1]
    if not _is_int(size) or size < 2 or size % 2 or size > side:
        raise ValueError(f"size must be an even integer in [2, {side}] (the input side), got {size!r}")
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()  # torch's FFT needs fp32 for sizes that are not powers of two
    half = size // 2
    spectrum = torch.fft.fft2(images)
    low = torch.cat([spectrum[..., :half, :], spectrum[..., side - half:, :]], dim=-2)  # lowest rows, both signs
    low = torch.cat([low[..., :half], low[..., side - half:]], dim=-1)                # lowest columns, both signs
    return torch.fft.ifft2(low * (size / side) ** 2).real
