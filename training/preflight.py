"""The checks between a resolved Config and the first file a run writes, and the claim of its output folder.

Order of a start (trainer.run): :func:`check_early` (cheap refusals: the folder's live or earlier run, the
augmentation policy the loader must implement), then the Trainer reads every file a flag names and builds
every piece (data, model, optimizer, the resumed state), then :func:`claim_output_dir` locks the folder and,
with ``--overwrite``, moves its earlier run aside. A command refused anywhere before the claim has printed one
line and created, moved or changed nothing.

Rank 0 alone looks at the output folder (the other ranks may not see it, e.g. without a shared file system);
every rank learns its verdict, so all stop together.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, TypeVar

from runtime.errors import UsageError

T = TypeVar("T")


def decided_by_main(check: Callable[[], T], placement: Any) -> Optional[T]:
    """``check()`` on rank 0; its UsageError stops every rank with the same message. Returns its value on rank 0,
    None elsewhere."""
    from runtime import distributed

    value, problem = None, None
    if placement.is_main:
        try:
            value = check()
        except UsageError as e:
            problem = str(e)
    problem = distributed.share_from_main(problem)
    if problem is not None:
        distributed.stop()
        raise UsageError(problem)
    return value


def _writes_output(cfg: Any) -> bool:
    return bool(cfg.run.output_dir) and not (cfg.run.eval_only or cfg.run.throughput)


def check_early(cfg: Any, placement: Any) -> None:
    """The refusals that need neither the data nor the model: the output folder is held by a live run, or
    holds a run this start would replace; the training recipe's augmentation policy does not parse for the
    data backend (every curriculum phase's magnitude included). Raises UsageError / DataError."""
    from runtime import rundir

    if _writes_output(cfg):
        decided_by_main(lambda: rundir.probe(cfg.run.output_dir, cfg.run.resume, cfg.run.overwrite), placement)
    if not (cfg.run.eval_only or cfg.run.throughput):
        _check_policies(cfg)


def _check_policies(cfg: Any) -> None:
    """Every augmentation policy the run will train with, read as its loader will read it (DataError)."""
    import datasets

    aug = cfg.data.aug
    policies = [aug.aa]
    if cfg.curriculum is not None:
        policies = sorted({datasets.aa_with_magnitude(aug.aa, cfg.curriculum.magnitude(e))
                           for e in cfg.curriculum.phase_starts()})
    for policy in policies:
        if cfg.data.backend == "dali":
            from dali_loader.pipeline import check_augment

            check_augment(dataclasses.replace(aug, aa=policy))
        elif not aug.three_augment:
            datasets.build_train_transform(dataclasses.replace(aug, aa=policy))  # timm parses it on creation


def claim_output_dir(cfg: Any, placement: Any, resume_stamp: Optional[tuple]):
    """Rank 0 locks the output folder (moving an earlier run aside with --overwrite) after every check has
    passed; ``resume_stamp``: :func:`rundir.stamp` of the resumed checkpoint when it was read. Returns the lock
    (None on other ranks, or for a run that writes nothing)."""
    from runtime import rundir

    if not _writes_output(cfg):
        return None
    return decided_by_main(lambda: rundir.claim(cfg.run.output_dir, cfg.run.resume, cfg.run.overwrite,
                                                resume_stamp), placement)
