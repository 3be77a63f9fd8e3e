"""Checks of the parsed flags, each failing with one UsageError line naming the flag.

:func:`check_flags` needs no torch (a bad flag fails within a second); :func:`check_against_model` builds the
model on the meta device to check ToE, token labeling and fine-tuning against its real patch grid.
"""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

from runtime.errors import UsageError

_AT_LEAST_ONE = ("batch_size", "epochs", "grad_accum_steps", "input_size", "print_freq", "fake_size", "nb_classes",
                 "ra_reps", "prefetch_factor")
_PROBABILITIES = ("drop", "drop_path", "smoothing", "distillation_alpha", "mixup_prob", "reprob",
                  "mixup_switch_prob")


def _flag(dest: str) -> str:
    return "--" + (dest if dest in ("num_workers", "start_epoch", "output_dir") else dest.replace("_", "-"))


def _check_ranges(args: argparse.Namespace) -> None:
    for dest in _AT_LEAST_ONE:
        if getattr(args, dest) < 1:
            raise UsageError(f"{_flag(dest)} must be >= 1, got {getattr(args, dest)}")
    for dest in _PROBABILITIES:
        if not 0.0 <= getattr(args, dest) <= 1.0:
            raise UsageError(f"{_flag(dest)} must be in [0, 1], got {getattr(args, dest)}")
    if args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.start_epoch < 0:
        raise UsageError(f"--start_epoch must be >= 0, got {args.start_epoch}")
    if args.start_epoch >= args.epochs and not (args.eval or args.throughput):
        raise UsageError(f"--start_epoch {args.start_epoch} leaves no epoch of --epochs {args.epochs} to train")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.distillation_tau <= 0:
        raise UsageError(f"--distillation-tau must be > 0, got {args.distillation_tau}")
    if args.model_ema and not 0.0 < args.model_ema_decay < 1.0:
        raise UsageError(f"--model-ema-decay must be in (0, 1), got {args.model_ema_decay}")
    if args.toe_layer < 0:
        raise UsageError(f"--toe-layer must be >= 0, got {args.toe_layer}")
    if args.lr_noise is not None and not 1 <= len(args.lr_noise) <= 2:
        raise UsageError("--lr-noise takes one or two values")
    if args.eval_crop_ratio is not None and not 0.0 < args.eval_crop_ratio <= 1.0:
        raise UsageError(f"--eval-crop-ratio must be in (0, 1], got {args.eval_crop_ratio}")


def _check_toe_flags(args: argparse.Namespace) -> None:
    from config import _TOE_FLAG_DEFAULTS, build_schedule

    if args.toe_r1 is None:
        defaults = {**_TOE_FLAG_DEFAULTS, "toe_dense_loss": "merged"}
        given = [_flag(dest) for dest, default in defaults.items() if getattr(args, dest) != default]
        if given:
            raise UsageError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without --toe-r1 "
                             f"(ToE is off)")
        return
    build_schedule(args)  # raises UsageError naming the flag
    if args.toe_r1 < 1.0 and not args.train_mode:
        raise UsageError("--no-train-mode cannot be combined with --toe-r1: ToE reduces tokens only while the "
                         "model is in training mode, so it would silently be off")
    if args.toe_dense_loss != "merged" and not args.token_label:
        raise UsageError("--toe-dense-loss only applies with --token-label")


def _check_data(args: argparse.Namespace) -> None:
    if args.data_set == "FAKE" or args.throughput:
        return
    if not args.data_path:
        raise UsageError(f"--data-path is required for --data-set {args.data_set}")
    path = os.path.expanduser(args.data_path)
    if args.data_set in ("CIFAR10", "CIFAR100"):  # CIFAR may be downloaded into a new folder
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"data path is not a folder: {args.data_path}")
        return
    if not os.path.isdir(path):
        raise UsageError(f"data path does not exist or is not a folder: {args.data_path}")
    if not os.listdir(path):
        raise UsageError(f"data path is empty: {args.data_path}")


def _check_token_label(args: argparse.Namespace) -> None:
    if not args.token_label:
        if args.token_label_gt or args.token_label_target != "reference":
            raise UsageError("--token-label-gt/--token-label-target only apply with --token-label")
        return
    if args.distillation_type != "none" or args.bce_loss:
        raise UsageError("--token-label cannot be combined with distillation or --bce-loss")
    if args.data_set not in ("FAKE", "IMNET", "FOLDER"):
        raise UsageError(f"--token-label needs an image folder data set (IMNET/FOLDER) or FAKE, not {args.data_set}")
    if args.token_label_data:
        if not os.path.isdir(args.token_label_data) or not os.listdir(args.token_label_data):
            raise UsageError(f"--token-label-data is missing or empty: {args.token_label_data}")
    elif args.data_set != "FAKE":
        raise UsageError("--token-label needs --token-label-data (the label maps)")
    if not 0.0 <= args.smoothing < 1.0:
        raise UsageError(f"--smoothing must be in [0, 1) with --token-label, got {args.smoothing}")


# timm scales RandAugment magnitudes by this denominator (auto_augment._LEVEL_DENOM): m above it is clipped
_RANDAUGMENT_MAX_MAGNITUDE = 10


def _check_curriculum(args: argparse.Namespace) -> None:
    """A curriculum must train every phase it lists, end at --input-size, and have a RandAugment to schedule."""
    if args.curriculum == "none" and not args.curriculum_table:
        return
    from toe.curriculum import Curriculum

    which = "--curriculum-table" if args.curriculum_table else f"--curriculum {args.curriculum}"
    if args.aa is None or args.aa.strip().lower() in ("", "none") or args.ThreeAugment:
        given = "--ThreeAugment" if args.ThreeAugment else "--aa none"
        raise UsageError(f"{which} schedules the RandAugment magnitude, which {given} turns off; drop {given} "
                         f"or the curriculum")
    if not args.curriculum_table:
        from toe.curriculum import EFFICIENTTRAIN_SIZES

        if args.epochs < len(EFFICIENTTRAIN_SIZES):
            raise UsageError(f"--curriculum {args.curriculum} has {len(EFFICIENTTRAIN_SIZES)} phases but --epochs "
                             f"{args.epochs} trains only the first {args.epochs}, never the final size; give "
                             f"--epochs >= {len(EFFICIENTTRAIN_SIZES)} or a shorter --curriculum-table")
        return
    try:
        phases = Curriculum.parse(args.curriculum_table).phases
    except ValueError as e:
        raise UsageError(f"--curriculum: {e}") from None
    for p in phases:
        if p.start_epoch >= args.epochs:
            raise UsageError(f"--curriculum-table phase {p.start_epoch}:{p.input_size}:{p.magnitude} starts at or "
                             f"after --epochs {args.epochs}, so it would never be trained")
        if p.input_size > args.input_size:
            raise UsageError(f"--curriculum-table phase size {p.input_size} is larger than --input-size "
                             f"{args.input_size}")
        if p.magnitude > _RANDAUGMENT_MAX_MAGNITUDE:
            raise UsageError(f"--curriculum-table magnitude {p.magnitude} is above timm's RandAugment maximum of "
                             f"{_RANDAUGMENT_MAX_MAGNITUDE}")
    if phases[-1].input_size != args.input_size:
        raise UsageError(f"--curriculum-table ends at size {phases[-1].input_size}, not at --input-size "
                         f"{args.input_size} (the size evaluation runs at)")


def _check_no_effect(args: argparse.Namespace) -> None:
    """Flags that would silently do nothing in the run as configured."""
    if not args.token_label:
        given = [flag for flag, on in (("--token-label-data", bool(args.token_label_data)),
                                       ("--cls-weight", args.cls_weight != 1.0),
                                       ("--dense-weight", args.dense_weight != 1.0)) if on]
        if given:
            raise UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --token-label")
    if args.teacher_path and args.distillation_type == "none":
        raise UsageError("--teacher-path has no effect with --distillation-type none (choose soft or hard)")
    for dest in ("mixup", "cutmix"):
        if getattr(args, dest) < 0:
            raise UsageError(f"--{dest} must be >= 0 (0 turns it off), got {getattr(args, dest)}")
    if args.nb_classes < 2:
        raise UsageError(f"--nb-classes must be >= 2 (a classifier needs two classes), got {args.nb_classes}")
    patch = args.patch_size if args.patch_size is not None else (args.model_kwargs or {}).get("patch_size")
    if isinstance(patch, int) and patch >= 1 and args.input_size % patch:
        raise UsageError(f"patch size {patch} does not divide --input-size {args.input_size}")


def _check_opt_betas(args: argparse.Namespace) -> None:
    if args.opt_betas is None:
        return
    wanted = 3 if args.opt.lower().split("_")[-1] == "adan" else 2  # timm's Adan takes three betas
    if len(args.opt_betas) != wanted:
        raise UsageError(f"--opt-betas takes {wanted} values for --opt {args.opt}, got {len(args.opt_betas)}: "
                         f"{' '.join(str(b) for b in args.opt_betas)}")
    if not all(0.0 <= b < 1.0 for b in args.opt_betas):
        raise UsageError(f"--opt-betas must each be in [0, 1), got {' '.join(str(b) for b in args.opt_betas)}")


def _check_output_dir(args: argparse.Namespace) -> None:
    """--output_dir must be a folder or creatable as one; --overwrite needs one to act on."""
    if args.output_dir:
        folder = os.path.abspath(os.path.expanduser(args.output_dir))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"--output_dir {args.output_dir} is a file, not a folder")
        parent = os.path.dirname(folder)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise UsageError(f"--output_dir {args.output_dir} lies under {parent}, which is a file")
    if not getattr(args, "overwrite", False):
        return
    if not args.output_dir:
        raise UsageError("--overwrite needs --output_dir (the folder whose earlier run it moves aside)")
    if args.eval or args.throughput:
        raise UsageError("--overwrite has no effect with --eval/--throughput, which write nothing")
    resume = (args.resume or "").strip()
    if resume.lower() not in ("", "none", "auto"):
        inside = os.path.dirname(os.path.abspath(resume)) == os.path.abspath(args.output_dir)
        if inside:
            raise UsageError(f"--overwrite moves {resume} aside before training; resume from a copy outside "
                             f"--output_dir, or drop --overwrite")


def _check_eval_weights(args: argparse.Namespace) -> None:
    from config import _resume_path

    if args.eval and not args.finetune and not _resume_path(args):
        where = f"no checkpoint.pth in --output_dir {args.output_dir}" if args.output_dir else "no --output_dir"
        raise UsageError(f"--eval needs weights: give --resume FILE or --finetune FILE ({where}, --resume "
                         f"{args.resume})")


def _check_data_backend(args: argparse.Namespace) -> None:
    """--data-backend dali: refuse what its pipeline does not implement, then check that DALI imports."""
    if args.data_backend != "dali" or args.throughput:
        return
    unsupported = [(args.token_label, "--token-label (its label maps must follow the crop)"),
                   (args.data_set in ("CIFAR10", "CIFAR100"), f"--data-set {args.data_set} (python arrays, no files)"),
                   (args.data_set == "FAKE", "--data-set FAKE (generated images, no files)"),
                   (args.ThreeAugment, "--ThreeAugment"), (args.src, "--src")]
    for given, what in unsupported:
        if given:
            raise UsageError(f"--data-backend dali does not support {what}; use --data-backend pil")
    import dali_loader

    dali_loader.require_dali()


def check_flags(args: argparse.Namespace) -> None:
    """Every check that needs neither torch nor data. Raises UsageError."""
    _check_ranges(args)
    _check_opt_betas(args)
    _check_output_dir(args)
    _check_eval_weights(args)
    _check_no_effect(args)
    if args.resplit:
        raise UsageError("--resplit is not supported: it erases only augmentation splits (AugMix/JSD), and this "
                         "training entry makes none")
    _check_toe_flags(args)
    _check_data(args)
    _check_data_backend(args)
    _check_token_label(args)
    mixing = (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None) and not args.token_label
    if mixing and args.batch_size % 2:
        raise UsageError(f"--batch-size must be even with mixup/cutmix, got {args.batch_size}")
    if args.curriculum_batch_scale and args.curriculum == "none" and not args.curriculum_table:
        raise UsageError("--curriculum-batch-scale needs --curriculum or --curriculum-table")
    if args.curriculum != "none" and args.curriculum_table:
        raise UsageError("give either --curriculum or --curriculum-table, not both")
    if args.distillation_type != "none" and not args.teacher_path:
        raise UsageError(f"--distillation-type {args.distillation_type} needs --teacher-path (teacher weights)")
    _check_curriculum(args)


def _build_on_meta(model_cfg: Any, num_classes: int, extra: dict):
    import torch

    from training import builders

    try:
        with torch.device("meta"):
            return builders.create_model(model_cfg.name, num_classes, model_cfg.input_size,
                                         {**model_cfg.kwargs, **extra})
    except UsageError:
        raise
    except Exception:  # model code that cannot run on meta tensors: build it for real
        return builders.create_model(model_cfg.name, num_classes, model_cfg.input_size, {**model_cfg.kwargs, **extra})


def check_against_model(model_cfg: Any, toe_cfg: Any, token_label: Any, num_classes: int) -> int:
    """Check the model name, and ToE / token labeling against the model's patch grid. Returns the patch
    size (for the curriculum's rounding)."""
    import timm

    import models  # noqa: F401

    if not timm.is_model(model_cfg.name):
        # ranked by edit distance: a typo is one or two characters away from the name meant
        close = difflib.get_close_matches(model_cfg.name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown model '{model_cfg.name}'{hint}")
    model = _build_on_meta(model_cfg, num_classes, {})
    embed = getattr(model, "patch_embed", None)
    grid = tuple(getattr(embed, "grid_size", ()) or ())
    if toe_cfg is not None:
        _check_toe_on(model, toe_cfg, grid, model_cfg.name)
    if token_label is not None and grid and grid != (token_label.label_size, token_label.label_size):
        raise UsageError(f"--token-label-size {token_label.label_size} does not match the patch grid "
                         f"{grid[0]}x{grid[1]} of {model_cfg.name} at --input-size {model_cfg.input_size}")
    patch = getattr(embed, "patch_size", None)
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 16)
    if model_cfg.input_size % patch:  # the model's own patch size (an explicit one is checked without torch)
        raise UsageError(f"patch size {patch} of {model_cfg.name} does not divide --input-size {model_cfg.input_size}")
    return patch


def _check_toe_on(model: Any, toe_cfg: Any, grid: tuple, model_name: str) -> None:
    import toe

    try:
        toe.apply(model, toe_cfg.schedule, **toe_cfg.apply_kwargs())
    except ValueError as e:
        if str(e).startswith("ToE cannot patch"):  # the model, not a --toe-* value, is the problem
            raise UsageError(f"--model {model_name}: {e}; it trains without --toe-r1") from None
        raise UsageError(f"--toe-layer/--toe-*: {e}") from None
    if not grid:
        return
    patches = int(grid[0] * grid[1])
    seeds = toe.schedule.count_tokens(toe_cfg.schedule.r0, patches)
    if seeds < 1:
        raise UsageError(f"--toe-r1 {toe_cfg.schedule.r1} (r0 {toe_cfg.schedule.r0}) keeps floor(r0 x {patches}) = 0 "
                         f"seed tokens of this model's {patches} patches; raise --toe-r1 or --toe-r0")
