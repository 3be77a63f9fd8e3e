"""Build the pieces of a run from plain values: the model (and ToE on it), EMA, optimizer, scheduler,
criterion and teacher. Nothing here reads argparse."""
from __future__ import annotations

import ast
from typing import Any, Dict, Iterable, Mapping, Optional

from runtime.errors import UsageError


def parse_key_values(items: Iterable[str], flag: str = "--model-kwargs") -> Dict[str, Any]:
    """['depth=6', 'global_pool=avg'] -> {'depth': 6, 'global_pool': 'avg'}: Python literals where they
    parse, plain strings otherwise. ValueError naming ``flag`` for an item without '='."""
    parsed: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE pairs, got {item!r}")
        try:
            parsed[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed[key] = text
    return parsed


def model_kwargs(extra: Optional[Mapping[str, Any]], patch_size: Optional[int] = None) -> Dict[str, Any]:
    """timm.create_model keyword arguments from --model-kwargs and the --patch-size shorthand."""
    kwargs = dict(extra or {})
    if patch_size is not None:
        kwargs["patch_size"] = int(patch_size)
    return kwargs


def _default_input_size(name: str) -> Optional[int]:
    import timm

    try:
        size = timm.models.get_pretrained_cfg_value(name, "input_size")
    except Exception:  # a model registered without a pretrained cfg
        return None
    return None if size is None else int(tuple(size)[-1])


def create_model(name: str, num_classes: int, input_size: int, extra: Mapping[str, Any], **kwargs: Any):
    """timm.create_model(name) without weights. ``img_size`` is passed only when ``input_size`` differs from
    the model's own resolution, and dropped for models that take any resolution (no such argument)."""
    import timm

    import models  # noqa: F401  (registers this repository's models with timm)

    options = {**dict(extra), **kwargs}
    size_given = "img_size" in options
    if not size_given and _default_input_size(name) != input_size:
        options["img_size"] = input_size
    try:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
        except TypeError as e:
            if size_given or "img_size" not in options or "img_size" not in str(e):
                raise
            options.pop("img_size")
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
    except TypeError as e:
        raise UsageError(f"model {name} does not accept these options ({', '.join(sorted(options))}): {e}") from None


# ------------------------------------------------------------------------------------------- model
def build_model(model_cfg: Any, toe_cfg: Any, num_classes: int, extra_kwargs: Mapping[str, Any],
                finetune_state: Optional[Dict[str, Any]] = None, distilled_training: bool = False):
    """The training model on CPU: created, fitted to --finetune weights, patched with ToE, and set up for
    gradient checkpointing / attention-only training. Returns (model, finetune report or None)."""
    from training import finetune

    model = create_model(model_cfg.name, num_classes, model_cfg.input_size, {**model_cfg.kwargs, **extra_kwargs},
                         drop_rate=model_cfg.drop, drop_path_rate=model_cfg.drop_path)
    report = None
    if finetune_state is not None:
        report = finetune.adapt_state_dict(finetune_state, model)
        model.load_state_dict(report["state"], strict=False)
    if toe_cfg is not None:
        import toe

        toe.apply(model, toe_cfg.schedule, **toe_cfg.apply_kwargs())
    if model_cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UsageError(f"model {model_cfg.name} does not support --grad-checkpointing")
        model.set_grad_checkpointing(True)
    if model_cfg.attn_only:
        freeze_all_but_attention(model)
    if distilled_training and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # distilled DeiT returns (class, distillation) logits in training
    return model, report


def freeze_all_but_attention(model) -> None:
    """--attn-only (DeiT III fine-tuning): train the attention weights, the embeddings and the head."""
    trainable_roots = ("head", "head_dist", "pos_embed", "patch_embed", "cls_token", "dist_token", "reg_token")
    for name, param in model.named_parameters():
        param.requires_grad_(".attn." in name or name.split(".")[0] in trainable_roots)


def num_patches(model) -> int:
    embed = getattr(model, "patch_embed", None)
    count = getattr(embed, "num_patches", None)
    if count is None:
        grid = getattr(embed, "grid_size", None)
        count = int(grid[0] * grid[1]) if grid is not None else 0
    return int(count)


def build_teacher(distill_cfg: Any, num_classes: int, input_size: int, weights: Dict[str, Any], device):
    """The frozen distillation teacher on ``device``; CheckpointError when the weights do not fit."""
    from runtime.errors import CheckpointError

    teacher = create_model(distill_cfg.teacher_model, num_classes, input_size, dict(distill_cfg.teacher_kwargs))
    try:
        teacher.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        from runtime.checkpoint import describe_mismatch

        why = describe_mismatch(weights, teacher.state_dict()) or str(e).splitlines()[0]
        raise CheckpointError(f"--teacher-path {distill_cfg.teacher_path} does not fit --teacher-model "
                              f"{distill_cfg.teacher_model} with {num_classes} classes: {why}") from None
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


# ------------------------------------------------------------------------------------- optimisation
_FUSABLE = ("adam", "adamw", "sgd", "momentum", "nesterov")


def optimizer_impl_kwargs(opt: str, impl: str, device_type: str) -> Dict[str, Any]:
    """torch's kernel choice for the optimizer: fused (one kernel for all parameters), foreach (batched
    per-tensor ops) or loop; 'auto' takes fused on CUDA for the optimizers torch can fuse."""
    name = opt.lower().split("_")[-1]
    if impl == "auto":
        return {"fused": True} if device_type == "cuda" and name in _FUSABLE else {}
    if impl == "fused":
        if name not in _FUSABLE:
            raise UsageError(f"--opt-impl fused: torch has no fused {opt}")
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def build_optimizer(model, optim_cfg: Any, device_type: str):
    from timm.optim import create_optimizer_v2

    kwargs: Dict[str, Any] = {"eps": optim_cfg.eps}
    if optim_cfg.betas:
        kwargs["betas"] = tuple(optim_cfg.betas)
    kwargs.update(optimizer_impl_kwargs(optim_cfg.opt, optim_cfg.impl, device_type))
    try:
        return create_optimizer_v2(model, opt=optim_cfg.opt, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                   momentum=optim_cfg.momentum, **kwargs)
    except (ValueError, AssertionError, TypeError, RuntimeError) as e:
        raise UsageError(f"--opt {optim_cfg.opt}: {e}") from None


def build_scheduler(optimizer, optim_cfg: Any, epochs: int, updates_per_epoch: int, seed: int):
    """timm's scheduler stepped once per epoch with ``step(epoch + 1)`` (see docs/fidelity.md), or, with
    ``sched_on_updates``, one stepped after every optimizer update: lr_schedule's warm-up cosine for
    ``--sched cosine`` (EfficientTrain's curve), else timm's own with updates as its time axis."""
    if not getattr(optim_cfg, "sched_on_updates", False):
        return _timm_scheduler(optimizer, optim_cfg, epochs, updates_per_epoch, seed)[0]
    if optim_cfg.sched == "cosine":
        from training import lr_schedule

        return lr_schedule.build_update_scheduler(optimizer, optim_cfg, epochs, updates_per_epoch, seed)
    scheduler = _timm_scheduler(optimizer, optim_cfg, epochs, updates_per_epoch, seed, step_on_epochs=False)[0]
    if getattr(scheduler, "t_in_epochs", True):
        raise UsageError(f"--sched {optim_cfg.sched} cannot step per update (--sched-on-updates)")
    return scheduler


def scheduled_epochs(optim_cfg: Any, epochs: int) -> int:
    """Epochs timm's train.py (LV-ViT's loop) trains for this schedule: timm's own count, e.g. ``epochs`` +
    ``cooldown_epochs`` for cosine, ``epochs`` for step (a throw-away optimizer stands in for the real one)."""
    import torch

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim_cfg.lr)
    return int(_timm_scheduler(dummy, optim_cfg, epochs, 1, 0)[1])


def _timm_scheduler(optimizer, optim_cfg: Any, epochs: int, updates_per_epoch: int, seed: int,
                    step_on_epochs: bool = True):
    from timm.scheduler import create_scheduler_v2

    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=optim_cfg.sched, num_epochs=epochs, decay_epochs=optim_cfg.decay_epochs,
            cooldown_epochs=optim_cfg.cooldown_epochs, patience_epochs=optim_cfg.patience_epochs,
            decay_rate=optim_cfg.decay_rate, min_lr=optim_cfg.min_lr, warmup_lr=optim_cfg.warmup_lr,
            warmup_epochs=optim_cfg.warmup_epochs, noise=optim_cfg.lr_noise, noise_pct=optim_cfg.lr_noise_pct,
            noise_std=optim_cfg.lr_noise_std, noise_seed=seed, step_on_epochs=step_on_epochs,
            updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise UsageError(f"--sched {optim_cfg.sched}: {e}") from None
    if scheduler is None:
        raise UsageError(f"unknown --sched '{optim_cfg.sched}'")
    return scheduler, num_epochs


def build_ema(model, model_cfg: Any):
    """timm's ModelEmaV3 copy of ``model`` (after toe.apply: the copy carries its own ToE hook)."""
    import torch
    from timm.utils import ModelEmaV3

    if not model_cfg.ema:
        return None
    return ModelEmaV3(model, decay=model_cfg.ema_decay,
                      device=torch.device("cpu") if model_cfg.ema_on_cpu else None)


def build_mixup(mixup_cfg: Any, smoothing: float, num_classes: int):
    from timm.data import Mixup

    if mixup_cfg is None:
        return None
    return Mixup(mixup_alpha=mixup_cfg.mixup, cutmix_alpha=mixup_cfg.cutmix, cutmix_minmax=mixup_cfg.cutmix_minmax,
                 prob=mixup_cfg.prob, switch_prob=mixup_cfg.switch_prob, mode=mixup_cfg.mode,
                 label_smoothing=smoothing, num_classes=num_classes)
