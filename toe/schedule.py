"""The epoch-based stage schedule of Token Expansion (paper Sec. 3.2, Eq. 1).

Training is split into ``ng`` (N_g) stages. Stage delta keeps the cumulative rate

    r_delta = r_{delta-1} + mu_delta,   mu_1 = r1 - r0,   mu_delta = (1 - r1) / (ng - 1) for delta > 1,

so the last stage trains on every token. This module is the only place that knows the schedule:
the op, the patch, the FLOPs accounting and the training entry all ask a :class:`Schedule`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

# Rates such as 0.7 - 0.4 = 0.29999999999999993 must not lose a token to the floor.
_FLOOR_EPS = 1e-6


def count_tokens(rate: float, num_patches: int) -> int:
    """Rounding-safe floor(rate * num_patches): the token count a keep rate gives."""
    return min(num_patches, int(math.floor(rate * num_patches + _FLOOR_EPS)))


@dataclass(frozen=True)
class Schedule:
    """Stage schedule: keep rate r1 in stage 1, growing linearly to 1.0 in stage ``ng``.

    Args:
        r1: keep rate of the first stage, r_1 in (0, 1].
        ng: number of stages N_g (>= 1; ng == 1 only with r1 == 1).
        k: repetition steps of the parallel expansion (Eq. 6), >= 1.
        r0: initial (seed) keep rate r_0 in (0, r1]; defaults to r1 / 2 (Algorithm 1, line 4).
        epochs: span of the schedule in epochs; stages split it into equal parts.
        stage_epochs: explicit 0-based start epoch of each stage, e.g. (0, 100, 200);
            overrides the equal split.
    """

    r1: float
    ng: int = 3
    k: int = 2
    r0: Optional[float] = None
    epochs: int = 300
    stage_epochs: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        r1 = float(self.r1)
        if not (0.0 < r1 <= 1.0):
            raise ValueError(f"r1 must be in (0, 1], got {self.r1}")
        r0 = r1 / 2 if self.r0 is None else float(self.r0)
        if not (0.0 < r0 <= r1):
            raise ValueError(f"r0 must be in (0, r1={r1}], got {self.r0}")
        if int(self.ng) != self.ng or self.ng < 1:
            raise ValueError(f"ng must be an integer >= 1, got {self.ng}")
        if self.ng == 1 and r1 != 1.0:
            raise ValueError(f"ng=1 is only allowed with r1=1 (got r1={r1}): one stage cannot grow to all tokens")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k}")
        if int(self.epochs) != self.epochs or self.epochs < self.ng:
            raise ValueError(f"epochs must be an integer >= ng={self.ng}, got {self.epochs}")
        object.__setattr__(self, "r1", r1)
        object.__setattr__(self, "r0", r0)
        object.__setattr__(self, "ng", int(self.ng))
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "epochs", int(self.epochs))
        if self.stage_epochs is not None:
            starts = tuple(int(e) for e in self.stage_epochs)
            if len(starts) != self.ng:
                raise ValueError(f"stage_epochs must list one start epoch per stage (ng={self.ng}), got {list(starts)}")
            if starts[0] != 0:
                raise ValueError(f"stage_epochs must start at 0, got {list(starts)}")
            if any(b <= a for a, b in zip(starts, starts[1:])):
                raise ValueError(f"stage_epochs must be strictly increasing, got {list(starts)}")
            if starts[-1] >= self.epochs:
                raise ValueError(f"stage_epochs must start every stage before epochs={self.epochs}, got {list(starts)}")
            object.__setattr__(self, "stage_epochs", starts)

    def stage(self, epoch: int) -> int:
        """1-based stage delta of the 0-based ``epoch``: min(ng, floor(ng * epoch / epochs) + 1)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.stage_epochs is not None:
            return sum(1 for start in self.stage_epochs if epoch >= start)
        # Integer arithmetic: no float error at the stage boundaries.
        return min(self.ng, (self.ng * int(epoch)) // self.epochs + 1)

    def rates(self, stage: int) -> Sequence[float]:
        """Cumulative keep rates [r0, r1, ..., r_stage] of ``stage`` (Eq. 1); the last stage ends at 1.0."""
        if not (1 <= stage <= self.ng):
            raise ValueError(f"stage must be in [1, {self.ng}], got {stage}")
        out = [self.r0, self.r1]
        for delta in range(2, stage + 1):
            out.append(1.0 if delta == self.ng else self.r1 + (delta - 1) * (1.0 - self.r1) / (self.ng - 1))
        return out

    def keep_rate(self, epoch: int) -> float:
        """Keep rate r_delta in force at ``epoch``."""
        return self.rates(self.stage(epoch))[-1]

    def num_tokens(self, epoch: int, num_patches: int) -> int:
        """Patch tokens kept at ``epoch`` out of ``num_patches`` (prefix tokens not counted)."""
        return count_tokens(self.keep_rate(epoch), num_patches)

    def stage_lengths(self) -> Sequence[int]:
        """Epochs spent in each stage, in order; they sum to ``epochs``."""
        starts = self.stage_starts()
        ends = list(starts[1:]) + [self.epochs]
        return [end - start for start, end in zip(starts, ends)]

    def stage_starts(self) -> Sequence[int]:
        """0-based first epoch of each stage."""
        if self.stage_epochs is not None:
            return list(self.stage_epochs)
        # Smallest e with floor(ng * e / epochs) >= delta - 1, i.e. ceil((delta - 1) * epochs / ng).
        return [-(-(delta * self.epochs) // self.ng) for delta in range(self.ng)]
