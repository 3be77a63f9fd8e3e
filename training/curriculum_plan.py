"""The curriculum plan: what each epoch trains on (input size, augmentation, device-side downsampling and
micro-batch scale), from plain values. Without a curriculum every epoch is the same: --input-size, the
run's augmentation, no downsampling, the micro-batch as given."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional


class CurriculumPlan:
    """Per-epoch training settings of a ``toe.curriculum.Curriculum`` (or of none).

    ``aug`` is the run's ``datasets.AugmentConfig``; ``scale_batch`` is --curriculum-batch-scale.
    """

    def __init__(self, curriculum: Optional[Any], input_size: int, aug: Any, grad_accum_steps: int,
                 scale_batch: bool) -> None:
        self.curriculum, self.input_size, self.aug = curriculum, int(input_size), aug
        self.grad_accum_steps, self.scale_batch = int(grad_accum_steps), bool(scale_batch)

    def phase(self, epoch: int) -> int:
        """The curriculum phase of ``epoch`` (0 without a curriculum): the loader is rebuilt when it changes."""
        return self.curriculum.phase(epoch) if self.curriculum is not None else 0

    def size(self, epoch: int) -> int:
        """The input size the model trains on at ``epoch``."""
        return self.input_size if self.curriculum is None else self.curriculum.input_size(epoch)

    def augment(self, epoch: int) -> Any:
        """The loader's augmentation at ``epoch``: the phase's size and RandAugment magnitude."""
        import datasets

        if self.curriculum is None:
            return self.aug
        # fourier: the loader augments at the final size; the device crops to the phase size (downsample)
        size = self.input_size if self.curriculum.downsample == "fourier" else self.curriculum.input_size(epoch)
        policy = datasets.aa_with_magnitude(self.aug.aa, self.curriculum.magnitude(epoch))
        return self.aug.with_train_stage(size, policy)

    def downsample(self, epoch: int) -> Optional[Callable]:
        """The device-side reduction of a fourier curriculum's batches at ``epoch``, or None."""
        size = self.size(epoch)
        if self.curriculum is None or self.curriculum.downsample != "fourier" or size == self.input_size:
            return None
        from functools import partial

        from toe.curriculum import frequency_crop  # looked up per call: tests replace it

        return partial(frequency_crop, size=size)

    def batch_scale(self, epoch: int) -> int:
        """--curriculum-batch-scale: the factor f by which a low-resolution phase's micro-batch grows while
        --grad-accum-steps shrinks by f (the global batch is unchanged). f is (final size / phase size)^2
        rounded, as a phase's memory per image scales with its token count, and must divide the
        accumulation steps (it is lowered to the largest divisor that fits). 1 without the option."""
        if not self.scale_batch or self.curriculum is None:
            return 1
        ratio = round((self.input_size / self.curriculum.input_size(epoch)) ** 2)
        accum = self.grad_accum_steps
        return max(f for f in range(1, accum + 1) if accum % f == 0 and f <= max(ratio, 1))

    def accum_steps(self, epoch: int) -> int:
        """Micro-batches per optimizer update at ``epoch``."""
        return self.grad_accum_steps // self.batch_scale(epoch)

    def log_fields(self, epoch: int, batch_size: int) -> Dict[str, Any]:
        """log.txt's curriculum keys at ``epoch`` (none without a curriculum)."""
        if self.curriculum is None:
            return {}
        return {"aa_magnitude": self.curriculum.magnitude(epoch), "micro_batch": batch_size * self.batch_scale(epoch),
                "grad_accum_steps": self.accum_steps(epoch)}
