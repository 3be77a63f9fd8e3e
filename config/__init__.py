"""Parsed flags -> one immutable :class:`Config`. This package (with its flag checks in checks.py) is the
only place besides main.py that reads ``args``.

:func:`from_args` runs in two steps. The flag checks come first and need no torch, so a bad flag fails in
well under a second. Then the values that depend on the machine or the model are resolved once: device,
mixed precision, learning rate scaled to the global batch, evaluation crop, and ToE against the model's
real patch count (a meta-device build). Every later module receives plain values from the Config.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from runtime.errors import UsageError

# flag -> (default, why it does nothing without --toe-r1); checked so a lone --toe-ng is not silently ignored
_TOE_FLAG_DEFAULTS = {"toe_ng": 3, "toe_k": 2, "toe_r0": None, "toe_layer": 1, "toe_distance": "cosine",
                      "toe_init": "spatial", "toe_no_expand": False, "toe_no_merge": False, "toe_epochs": None,
                      "toe_stage_epochs": None, "toe_sparse_eval": False, "toe_compat": "none"}


@dataclass(frozen=True)
class ToEConfig:
    schedule: Any  # toe.Schedule
    layer: int
    distance: str
    init: str
    expand: bool
    merge: bool
    sparse_eval: bool
    compat: str

    def apply_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of toe.apply besides the model and the schedule."""
        return {"layer": self.layer, "distance": self.distance, "init": self.init, "expand": self.expand,
                "merge": self.merge, "sparse_eval": self.sparse_eval, "compat": self.compat}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kwargs: Dict[str, Any]
    input_size: int
    drop: float
    drop_path: float
    ema: bool
    ema_decay: float
    ema_on_cpu: bool
    compile: bool
    compile_backend: str
    grad_checkpointing: bool
    attn_only: bool
    finetune: str


@dataclass(frozen=True)
class OptimConfig:
    opt: str
    lr: float  # scaled to the global batch unless --unscale-lr
    eps: float
    betas: Optional[Tuple[float, ...]]
    momentum: float
    weight_decay: float
    clip_grad: Optional[float]
    impl: str
    sched: str
    warmup_lr: float
    min_lr: float
    warmup_epochs: int
    cooldown_epochs: int
    decay_epochs: float
    patience_epochs: int
    decay_rate: float
    lr_noise: Any
    lr_noise_pct: float
    lr_noise_std: float
    sched_on_updates: bool = False  # step per optimizer update (training/lr_schedule.py)


@dataclass(frozen=True)
class MixupConfig:
    mixup: float
    cutmix: float
    cutmix_minmax: Optional[Tuple[float, ...]]
    prob: float
    switch_prob: float
    mode: str


@dataclass(frozen=True)
class DataConfig:
    spec: Any  # datasets.DataSpec
    aug: Any  # datasets.AugmentConfig
    batch_size: int
    num_workers: int
    pin_memory: bool
    prefetch_factor: int
    persistent_workers: bool
    repeated_aug: bool
    ra_reps: int
    dist_eval: bool
    mixup: Optional[MixupConfig]
    smoothing: float
    bce_loss: bool
    backend: str = "pil"  # --data-backend: pil | dali


@dataclass(frozen=True)
class DistillConfig:
    kind: str  # none | soft | hard
    teacher_model: str
    teacher_path: str
    teacher_kwargs: Dict[str, Any]
    alpha: float
    tau: float


@dataclass(frozen=True)
class TokenLabelConfig:
    label_root: str
    label_size: int
    target: str
    ground_truth: bool
    cls_weight: float
    dense_weight: float
    mix_token: bool
    dense_loss: str


@dataclass(frozen=True)
class RunConfig:
    output_dir: str
    device: str
    seed: int
    resume: str  # checkpoint path, '' for a fresh start
    resume_changed_ok: bool
    start_epoch: int
    epochs: int  # epochs the loop trains: --epochs, + timm's cooldown with --train-cooldown
    eval_only: bool
    throughput: bool
    amp: str  # resolved: bf16 | fp16 | none
    print_freq: int
    grad_accum_steps: int
    curriculum_batch_scale: bool
    train_mode: bool
    dist_url: str
    local_rank: Optional[int]
    world_size: int
    global_batch: int
    schedule_epochs: int = 0  # --epochs: the lr schedule's length (0: the same as ``epochs``)
    overwrite: bool = False  # --overwrite: move an earlier run in output_dir aside
    resume_flag: str = "auto"  # --resume as given (auto / none / a path), for the interruption hint


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    toe: Optional[ToEConfig]
    optim: OptimConfig
    data: DataConfig
    distill: DistillConfig
    token_label: Optional[TokenLabelConfig]
    run: RunConfig
    curriculum: Any  # toe.curriculum.Curriculum or None
    flags: Dict[str, Any] = field(default_factory=dict)  # the flags as resolved, for args.json and resume


def from_args(args: argparse.Namespace) -> Config:
    """Check every flag, resolve the machine- and model-dependent values, and freeze the result."""
    from config import checks

    checks.check_flags(args)  # no torch import before this returns
    return _resolve(args)


# ----------------------------------------------------------------------------------------- resolution
def _stage_epochs(values: Optional[list]) -> Optional[Tuple[int, ...]]:
    if not values:
        return None
    items = [part for value in values for part in str(value).split(",") if part.strip()]
    try:
        return tuple(int(part) for part in items)
    except ValueError:
        raise UsageError(f"--toe-stage-epochs takes integers, got {' '.join(values)}") from None


def build_schedule(args: argparse.Namespace):
    """toe.Schedule of the --toe-* flags (None without --toe-r1); errors name the flag."""
    import toe

    if args.toe_r1 is None:
        return None
    epochs = args.toe_epochs if args.toe_epochs is not None else args.epochs
    if args.toe_r1 >= 1.0:  # ToE is off: a short run need not fit ng stages
        epochs = max(epochs, args.toe_ng)
    try:
        return toe.Schedule(r1=args.toe_r1, ng=args.toe_ng, k=args.toe_k, r0=args.toe_r0, epochs=epochs,
                            stage_epochs=_stage_epochs(args.toe_stage_epochs))
    except ValueError as e:
        argument = str(e).split(" ", 1)[0]
        flag = {"stage_epochs": "--toe-stage-epochs", "epochs": "--toe-epochs/--epochs"}.get(argument,
                                                                                           "--toe-" + argument)
        raise UsageError(f"{flag}: {e}") from None


def _toe(args: argparse.Namespace) -> Optional[ToEConfig]:
    schedule = build_schedule(args)
    if schedule is None or args.toe_r1 >= 1.0:
        return None
    return ToEConfig(schedule, args.toe_layer, args.toe_distance, args.toe_init, not args.toe_no_expand,
                     not args.toe_no_merge, args.toe_sparse_eval, args.toe_compat)


def _mixup(args: argparse.Namespace) -> Optional[MixupConfig]:
    # MixToken replaces mixup/cutmix under token labeling: mixing images would break the label maps
    if args.token_label or not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return MixupConfig(args.mixup, args.cutmix, tuple(args.cutmix_minmax) if args.cutmix_minmax else None,
                       args.mixup_prob, args.mixup_switch_prob, args.mixup_mode)


def _eval_crop_ratio(args: argparse.Namespace) -> float:
    """--eval-crop-ratio, else this repository's models' own crop_pct (LV-ViT: T/S 0.9, M 1.0), else DeiT's
    0.875 (timm lists 0.9 for DeiT, but DeiT's published numbers used 0.875)."""
    if args.eval_crop_ratio is not None:
        return float(args.eval_crop_ratio)
    import timm

    import models  # noqa: F401

    if args.model in timm.list_models(module="lvvit"):
        crop = timm.models.get_pretrained_cfg_value(args.model, "crop_pct")
        if crop:
            return float(crop)
    return 0.875


def _data(args: argparse.Namespace) -> DataConfig:
    import datasets

    spec = datasets.DataSpec(name=args.data_set, path=args.data_path, skip_bad_images=args.skip_bad_images,
                             inat_category=args.inat_category, fake_size=args.fake_size,
                             fake_classes=args.nb_classes, fake_image_size=args.input_size, fake_seed=0)
    aug = datasets.AugmentConfig(input_size=args.input_size, aa=args.aa, color_jitter=args.color_jitter,
                                 train_interpolation=args.train_interpolation, reprob=args.reprob,
                                 remode=args.remode, recount=args.recount, three_augment=args.ThreeAugment,
                                 simple_random_crop=args.src, eval_crop_ratio=_eval_crop_ratio(args))
    return DataConfig(spec, aug, args.batch_size, args.num_workers, args.pin_mem, args.prefetch_factor,
                      args.persistent_workers, args.repeated_aug, args.ra_reps, args.dist_eval, _mixup(args),
                      args.smoothing, args.bce_loss, args.data_backend)


def _optim(args: argparse.Namespace, global_batch: int) -> OptimConfig:
    lr = args.lr if args.unscale_lr else args.lr * global_batch / 512.0
    noise = args.lr_noise
    noise = None if noise is None else (noise[0] if len(noise) == 1 else list(noise))
    return OptimConfig(args.opt, lr, args.opt_eps, tuple(args.opt_betas) if args.opt_betas else None, args.momentum,
                       args.weight_decay, args.clip_grad, args.opt_impl, args.sched, args.warmup_lr, args.min_lr,
                       args.warmup_epochs, args.cooldown_epochs, args.decay_epochs, args.patience_epochs,
                       args.decay_rate, noise, args.lr_noise_pct, args.lr_noise_std,
                       sched_on_updates=args.sched_on_updates)


def _device_and_amp(args: argparse.Namespace) -> Tuple[str, str]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available (use --device cpu)")
    amp = args.amp
    if amp == "auto":
        amp = "fp16" if device.startswith("cuda") else "none"
    elif amp == "fp16" and not device.startswith("cuda"):
        print("warning: --amp fp16 on CPU is slow; bf16 is the CPU choice", file=sys.stderr)
    return device, amp


def _resume_path(args: argparse.Namespace) -> str:
    choice = (args.resume or "").strip()
    if choice.lower() in ("", "none"):
        return ""
    if choice.lower() == "auto":
        if getattr(args, "overwrite", False):
            return ""  # the folder's checkpoint is moved aside: a fresh start
        candidate = os.path.join(args.output_dir, "checkpoint.pth") if args.output_dir else ""
        return candidate if candidate and os.path.isfile(candidate) else ""
    return choice


def _curriculum(args: argparse.Namespace, patch_size: int):
    if args.curriculum == "none" and not args.curriculum_table:
        return None
    from toe.curriculum import Curriculum

    try:
        if args.curriculum_table:
            curriculum = Curriculum.parse(args.curriculum_table, patch_size=patch_size)
        else:
            curriculum = Curriculum.efficienttrain(epochs=args.epochs, final_size=args.input_size,
                                                   patch_size=patch_size)
        curriculum = dataclasses.replace(curriculum, downsample=args.curriculum_downsample)
    except ValueError as e:
        raise UsageError(f"--curriculum: {e}") from None
    if curriculum.downsample == "fourier" and curriculum.odd_sizes():
        raise UsageError(f"--curriculum-downsample fourier keeps size/2 frequencies each way, so every phase size "
                         f"must be even, got {curriculum.odd_sizes()}; use even sizes or --curriculum-downsample resize")
    return curriculum


def _resolve(args: argparse.Namespace) -> Config:
    from training import builders
    from runtime import distributed
    import utils
    from config import checks

    distributed.check_world_size(args.world_size, args.local_rank)
    _, world, _ = distributed.launcher_placement(args.local_rank)
    global_batch = args.batch_size * world * args.grad_accum_steps
    device, amp = _device_and_amp(args)
    kwargs = builders.model_kwargs(args.model_kwargs, args.patch_size)
    model = ModelConfig(args.model, kwargs, args.input_size, args.drop, args.drop_path, args.model_ema,
                        args.model_ema_decay, args.model_ema_force_cpu, args.compile, args.compile_backend,
                        args.grad_checkpointing,
                        args.attn_only, args.finetune)
    token_label = None
    if args.token_label:
        token_label = TokenLabelConfig(args.token_label_data, args.token_label_size, args.token_label_target,
                                       args.token_label_gt, args.cls_weight, args.dense_weight, args.mix_token,
                                       args.toe_dense_loss)
    optim = _optim(args, global_batch)
    loop_epochs = builders.scheduled_epochs(optim, args.epochs) if args.train_cooldown else args.epochs
    run = RunConfig(args.output_dir, device, args.seed, _resume_path(args), args.resume_changed_ok,
                    args.start_epoch, loop_epochs, args.eval, args.throughput, amp, args.print_freq,
                    args.grad_accum_steps, args.curriculum_batch_scale, args.train_mode, args.dist_url,
                    args.local_rank, world, global_batch, schedule_epochs=args.epochs, overwrite=args.overwrite,
                    resume_flag=(args.resume or "none").strip())
    distill = DistillConfig(args.distillation_type, args.teacher_model, args.teacher_path,
                            dict(args.teacher_model_kwargs), args.distillation_alpha, args.distillation_tau)
    toe_cfg = _toe(args)
    patch = checks.check_against_model(model, toe_cfg, token_label, args.nb_classes)
    data = _data(args)
    flags = utils.plain_dict(vars(args))
    stage_epochs = _stage_epochs(args.toe_stage_epochs)
    flags.update(amp=amp, device=device, lr_scaled=optim.lr, global_batch=global_batch,
                 eval_crop_ratio=data.aug.eval_crop_ratio,
                 toe_stage_epochs=list(stage_epochs) if stage_epochs else None)
    return Config(model, toe_cfg, optim, data, distill, token_label, run, _curriculum(args, patch), flags)

