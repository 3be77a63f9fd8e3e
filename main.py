"""DeiT training entry with Token Expansion (ToE, CVPR 2024): argument parsing and wiring only.

    python main.py --model deit_tiny_patch16_224 --data-path /imagenet --toe-r1 0.5 --toe-ng 3 --toe-k 2
    torchrun --nproc_per_node 4 main.py ... --batch-size 256

Bad input (flags, model, data path, checkpoints) gives one `error: ...` line on stderr and exit code 2.
A non-finite loss stops with one line naming the epoch, the iteration and the checkpoint to resume from
(exit code 3). The training loop is engine.train_one_epoch/evaluate; checkpoints and logs are in utils.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, Optional, Sequence

EXIT_USAGE = 2
EXIT_NONFINITE = 3


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def parse_key_values(items: Iterable[str], flag: str = "--model-kwargs") -> Dict[str, Any]:
    """`a=1 b=x` -> {'a': 1, 'b': 'x'}: values parsed as Python literals when possible, plain strings
    (such as global_pool=avg) otherwise. Raises ValueError naming ``flag`` for an item without '='."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE pairs, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as a single `error: ...` line (no usage block), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


class _KeyValue(argparse.Action):
    """`--model-kwargs a=1 b=x` -> {'a': 1, 'b': 'x'} (see parse_key_values)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_key_values(values, option_string))
        except ValueError as e:
            raise UsageError(str(e)) from None


def get_args_parser() -> argparse.ArgumentParser:
    """DeiT's flags (same names and defaults), ToE's --toe-* flags, and the reliability options."""
    parser = _Parser(prog="main.py", description="DeiT training and evaluation with Token Expansion (ToE)")
    parser.add_argument("--batch-size", default=64, type=int, help="per process")
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--bce-loss", action="store_true")
    parser.add_argument("--unscale-lr", action="store_true",
                        help="use --lr as is (default: lr * global_batch / 512, global_batch including "
                             "--grad-accum-steps)")
    parser.add_argument("--grad-accum-steps", default=1, type=int,
                        help="micro-batches per optimizer step (global batch = batch * world * steps)")

    g = parser.add_argument_group("Model")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL")
    g.add_argument("--input-size", default=224, type=int, help="image size")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_KeyValue, metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs, e.g. patch_size=4 depth=3 embed_dim=64 num_heads=2")
    g.add_argument("--patch-size", default=None, type=int, help="shorthand for --model-kwargs patch_size=N")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    parser.set_defaults(model_ema=True)
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true")

    g = parser.add_argument_group("Optimizer")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER")
    g.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M")
    g.add_argument("--weight-decay", type=float, default=0.05)

    g = parser.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER")
    g.add_argument("--lr", type=float, default=5e-4, metavar="LR")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT")
    g.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV")
    g.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR")
    g.add_argument("--min-lr", type=float, default=1e-5, metavar="LR")
    g.add_argument("--decay-epochs", type=float, default=30, metavar="N")
    g.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    g.add_argument("--cooldown-epochs", type=int, default=10, metavar="N")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")

    g = parser.add_argument_group("Augmentation")
    g.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", type=str, default="bicubic")
    g.add_argument("--repeated-aug", action="store_true")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    parser.set_defaults(repeated_aug=True)
    g.add_argument("--ra-reps", type=int, default=3, help="repeats per image of the repeated-aug sampler")
    g.add_argument("--train-mode", action="store_true")
    g.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    parser.set_defaults(train_mode=True)
    g.add_argument("--ThreeAugment", action="store_true")
    g.add_argument("--src", action="store_true", help="simple random crop")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT")
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--resplit", action="store_true", default=False)

    g = parser.add_argument_group("Mixup")
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch", choices=["batch", "pair", "elem"])

    g = parser.add_argument_group("Distillation")
    g.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    g.add_argument("--teacher-path", type=str, default="")
    g.add_argument("--teacher-model-kwargs", nargs="*", default={}, action=_KeyValue, metavar="KEY=VALUE")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], type=str)
    g.add_argument("--distillation-alpha", default=0.5, type=float)
    g.add_argument("--distillation-tau", default=1.0, type=float)

    g = parser.add_argument_group("Token labeling (LV-ViT)")
    g.add_argument("--token-label", action="store_true", help="train with dense token labels (lvvit_* models)")
    g.add_argument("--token-label-data", default="", type=str,
                   help="label maps <dir>/<class>/<image>.pt [2, K, S, S] (FAKE: synthetic maps when empty)")
    g.add_argument("--token-label-size", default=14, type=int, help="label map side = the patch grid side")
    g.add_argument("--cls-weight", default=1.0, type=float, help="weight of the class-token loss")
    g.add_argument("--dense-weight", default=0.5, type=float, help="weight of the dense token-label loss")
    g.add_argument("--mix-token", action="store_true", help="MixToken (default on with --token-label)")
    g.add_argument("--no-mix-token", action="store_false", dest="mix_token")
    parser.set_defaults(mix_token=True)
    g.add_argument("--toe-dense-loss", default="merged", choices=["merged", "kept"],
                   help="with ToE: supervise every position through the token that carries it (merged), or "
                        "only positions whose own token was kept (kept)")

    g = parser.add_argument_group("Fine-tuning")
    g.add_argument("--finetune", default="", help="checkpoint to start from (head dropped if its shape differs, "
                                                  "pos_embed interpolated)")
    g.add_argument("--attn-only", action="store_true")

    g = parser.add_argument_group("Dataset")
    g.add_argument("--data-path", default=None, type=str)
    g.add_argument("--data-set", default="IMNET", type=str.upper,
                   choices=["CIFAR10", "CIFAR100", "IMNET", "INAT18", "INAT19", "FOLDER", "FAKE"])
    g.add_argument("--inat-category", default="name", type=str,
                   choices=["kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name"])
    g.add_argument("--fake-size", default=1000, type=int, help="FAKE: training images (val has N/5)")
    g.add_argument("--nb-classes", default=10, type=int, help="FAKE: number of classes")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip (and count) corrupt images instead of stopping with an error")
    g.add_argument("--eval-crop-ratio", default=0.875, type=float)
    g.add_argument("--num_workers", default=10, type=int)
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    g = parser.add_argument_group("Run")
    g.add_argument("--output_dir", default="", help="where to save log.txt, checkpoints and tb/ (empty: nothing)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="auto",
                   help="checkpoint to resume from; 'auto' (default) = output_dir/checkpoint.pth when present, "
                        "'none' = start fresh")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N")
    g.add_argument("--eval", action="store_true", help="evaluate the (resumed/fine-tune) model and exit")
    g.add_argument("--throughput", action="store_true", help="measure images/s and exit")
    g.add_argument("--dist-eval", action="store_true", default=False, help="exact distributed evaluation")
    g.add_argument("--amp", default="none", choices=["bf16", "fp16", "none"])
    g.add_argument("--print-freq", default=10, type=int)
    g.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    g.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    g.add_argument("--local_rank", "--local-rank", default=0, type=int, help=argparse.SUPPRESS)

    g = parser.add_argument_group("Token Expansion (ToE)")
    g.add_argument("--toe-r1", type=float, default=None, help="keep rate of stage 1; ToE is off when absent or 1")
    g.add_argument("--toe-ng", type=int, default=3, help="number of stages")
    g.add_argument("--toe-k", type=int, default=2, help="repetition steps of the parallel expansion")
    g.add_argument("--toe-r0", type=float, default=None, help="initial keep rate (default r1/2)")
    g.add_argument("--toe-layer", type=int, default=1, help="block whose input is reduced (0: after embedding)")
    g.add_argument("--toe-distance", default="cosine", choices=["cosine", "euclidean", "manhattan"])
    g.add_argument("--toe-init", default="spatial", choices=["spatial", "random"])
    g.add_argument("--toe-no-expand", action="store_true", help="ablation: no expansion, take r_delta directly")
    g.add_argument("--toe-no-merge", action="store_true", help="ablation: drop unselected tokens")
    g.add_argument("--toe-epochs", type=int, default=None, help="span of the schedule (default --epochs)")
    g.add_argument("--toe-stage-epochs", type=int, nargs="+", default=None, metavar="E",
                   help="explicit 0-based start epoch of each stage, e.g. 0 100 200")
    g.add_argument("--toe-sparse-eval", action="store_true", help="also reduce tokens at evaluation")
    return parser


# ================================================================================================ validation
def toe_enabled(args: argparse.Namespace) -> bool:
    return args.toe_r1 is not None and args.toe_r1 < 1.0


def build_schedule(args: argparse.Namespace):
    """toe.Schedule from the flags (None when --toe-r1 is absent); ValueError names the bad argument."""
    import toe

    if args.toe_r1 is None:
        return None
    epochs = args.toe_epochs if args.toe_epochs is not None else args.epochs
    try:
        return toe.Schedule(r1=args.toe_r1, ng=args.toe_ng, k=args.toe_k, r0=args.toe_r0, epochs=epochs,
                            stage_epochs=tuple(args.toe_stage_epochs) if args.toe_stage_epochs else None)
    except ValueError as e:
        msg = str(e)
        for name in ("stage_epochs", "r1", "r0", "ng", "k", "epochs"):  # name the flag, not the kwarg
            if msg.startswith(name + " "):
                flag = "--toe-stage-epochs" if name == "stage_epochs" else (
                    "--toe-epochs/--epochs" if name == "epochs" else "--toe-" + name)
                msg = f"{flag}: {msg}"
                break
        raise UsageError(msg) from None


def model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    kw = dict(args.model_kwargs or {})
    if args.patch_size is not None:
        kw["patch_size"] = args.patch_size
    if getattr(args, "token_label", False):
        # LV-ViT's dense training output (cls, aux, MixToken box, mask) for the token-labeling loss
        kw.update(return_dense=True, mix_token=args.mix_token, toe_dense_loss=args.toe_dense_loss)
    return kw


def create_model(name: str, num_classes: int, input_size: int, extra: Dict[str, Any], **kwargs: Any):
    """timm.create_model, passing img_size only when it differs from the model's default resolution."""
    import timm

    kw = dict(extra)
    kw.update(kwargs)
    default = None
    try:
        default = timm.models.get_pretrained_cfg_value(name, "input_size")
    except Exception:  # models registered without a pretrained cfg
        default = None
    if "img_size" not in kw and (default is None or tuple(default)[-1] != input_size):
        kw["img_size"] = input_size
    try:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
        except TypeError as e:
            if "img_size" not in str(e) or "img_size" in extra:
                raise
            # convolutional models take any resolution and have no img_size argument
            kw.pop("img_size")
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    except TypeError as e:
        raise UsageError(f"model {name} does not accept these options ({', '.join(sorted(kw))}): {e}") from None


def _resolve_resume(args: argparse.Namespace) -> str:
    """The checkpoint path to resume from, or '' for a fresh start."""
    r = (args.resume or "").strip()
    if r.lower() in ("", "none"):
        return ""
    if r.lower() == "auto":
        if args.output_dir:
            p = os.path.join(args.output_dir, "checkpoint.pth")
            if os.path.isfile(p):
                return p
        return ""
    return r


def validate_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Every check that needs no data and no training: raises UsageError / CheckpointError.

    Returns {'schedule', 'resume_path', 'resume_ckpt', 'finetune_ckpt', 'teacher_ckpt'} so checkpoints are
    read only once.
    """
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--grad-accum-steps": args.grad_accum_steps,
                "--input-size": args.input_size, "--print-freq": args.print_freq, "--fake-size": args.fake_size,
                "--nb-classes": args.nb_classes, "--ra-reps": args.ra_reps}
    for flag, v in positive.items():
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.start_epoch:
        raise UsageError(f"--start_epoch must be >= 0, got {args.start_epoch}")
    for flag, v in {"--drop": args.drop, "--drop-path": args.drop_path, "--smoothing": args.smoothing,
                    "--distillation-alpha": args.distillation_alpha, "--mixup-prob": args.mixup_prob,
                    "--reprob": args.reprob}.items():
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"{flag} must be in [0, 1], got {v}")
    if args.distillation_tau <= 0:
        raise UsageError(f"--distillation-tau must be > 0, got {args.distillation_tau}")
    if args.model_ema and not 0.0 < args.model_ema_decay < 1.0:
        raise UsageError(f"--model-ema-decay must be in (0, 1), got {args.model_ema_decay}")
    if args.toe_layer < 0:
        raise UsageError(f"--toe-layer must be >= 0, got {args.toe_layer}")

    schedule = build_schedule(args)

    # data path: cheap existence checks here; the data set itself reports anything deeper (DataError)
    if args.data_set != "FAKE" and not args.throughput:
        if not args.data_path:
            raise UsageError(f"--data-path is required for --data-set {args.data_set}")
        p = os.path.expanduser(args.data_path)
        if args.data_set not in ("CIFAR10", "CIFAR100"):  # CIFAR may be downloaded into a new folder
            if not os.path.isdir(p):
                raise UsageError(f"data path does not exist or is not a folder: {args.data_path}")
            if not os.listdir(p):
                raise UsageError(f"data path is empty: {args.data_path}")
        elif os.path.exists(p) and not os.path.isdir(p):
            raise UsageError(f"data path is not a folder: {args.data_path}")

    # flag-only checks above need no timm: bad flags fail fast
    import timm
    import torch

    import models  # noqa: F401  (registers this repository's models in timm)
    import utils

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available (use --device cpu)")
    if args.amp == "fp16" and not str(args.device).startswith("cuda"):
        print("warning: --amp fp16 on CPU is slow; bf16 is the CPU choice", file=sys.stderr)
    if args.token_label:
        if args.distillation_type != "none" or args.bce_loss:
            raise UsageError("--token-label cannot be combined with distillation or --bce-loss")
        if args.data_set not in ("FAKE", "IMNET", "FOLDER"):
            raise UsageError(f"--token-label needs an image folder data set (IMNET/FOLDER) or FAKE, "
                             f"not {args.data_set}")
        if args.token_label_data:
            if not os.path.isdir(args.token_label_data) or not os.listdir(args.token_label_data):
                raise UsageError(f"--token-label-data is missing or empty: {args.token_label_data}")
        elif args.data_set != "FAKE":
            raise UsageError("--token-label needs --token-label-data (the label maps)")
        if not 0.0 <= args.smoothing < 1.0:
            raise UsageError(f"--smoothing must be in [0, 1) with --token-label, got {args.smoothing}")
    mixup_active = (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None) and not args.token_label
    if mixup_active and args.batch_size % 2 != 0:
        raise UsageError(f"--batch-size must be even with mixup/cutmix, got {args.batch_size}")
    if args.lr_noise is not None and not 1 <= len(args.lr_noise) <= 2:
        raise UsageError("--lr-noise takes one or two values")

    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:5] if args.model else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UsageError(f"unknown model '{args.model}'{hint}")
    if args.distillation_type != "none":
        if not timm.is_model(args.teacher_model):
            raise UsageError(f"unknown teacher model '{args.teacher_model}'")
        if not args.teacher_path:
            raise UsageError(f"--distillation-type {args.distillation_type} needs --teacher-path (teacher weights)")

    resume_path = _resolve_resume(args)
    out = {"schedule": schedule, "resume_path": resume_path, "resume_ckpt": None, "finetune_ckpt": None,
           "teacher_ckpt": None}
    if resume_path:
        ckpt = utils.load_checkpoint_file(resume_path)
        if "model" not in ckpt and not args.eval:
            raise utils.CheckpointError(f"cannot resume from {resume_path}: it has no 'model' entry "
                                        f"(use --finetune for bare weights)")
        out["resume_ckpt"] = ckpt
    if args.finetune:
        out["finetune_ckpt"] = utils.load_checkpoint_file(args.finetune)
    if args.distillation_type != "none":
        out["teacher_ckpt"] = utils.load_checkpoint_file(args.teacher_path)

    _check_model_compat(args, out)
    return out


def _check_model_compat(args: argparse.Namespace, v: Dict[str, Any]) -> None:
    """Build the model cheaply (meta device when possible) to check ToE's layer and the --finetune
    checkpoint before any data is read."""
    import torch

    import toe
    import utils

    try:
        with torch.device("meta"):
            m = create_model(args.model, args.nb_classes, args.input_size, model_kwargs(args))
    except UsageError:
        raise
    except Exception:  # some model code cannot run on meta tensors: build it for real
        m = create_model(args.model, args.nb_classes, args.input_size, model_kwargs(args))
    if toe_enabled(args):
        try:
            toe.apply(m, v["schedule"], layer=args.toe_layer, distance=args.toe_distance, init=args.toe_init,
                      expand=not args.toe_no_expand, merge=not args.toe_no_merge, sparse_eval=args.toe_sparse_eval)
        except ValueError as e:
            raise UsageError(f"--toe: {e}") from None
    if v["finetune_ckpt"] is not None:
        utils.adapt_state_dict_for_finetune(utils.model_state_from_checkpoint(v["finetune_ckpt"]), m)
    if args.token_label:
        grid = getattr(getattr(m, "patch_embed", None), "grid_size", None)
        if grid is not None and tuple(grid) != (args.token_label_size, args.token_label_size):
            raise UsageError(f"--token-label-size {args.token_label_size} does not match the patch grid "
                             f"{grid[0]}x{grid[1]} of {args.model} at --input-size {args.input_size}")


# ================================================================================================ run
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate, run. Returns the process exit code."""
    try:
        args = get_args_parser().parse_args(argv)
        v = validate_args(args)
        return run(args, v)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except Exception as e:
        # Checkpoint and data errors come from lazily imported modules (torch is not imported before the
        # flag checks, so a bad flag fails fast); anything else is a real bug: re-raise.
        user_errors = tuple(getattr(sys.modules.get(mod), name, ()) for mod, name in
                            (("utils", "CheckpointError"), ("datasets", "DataError")))
        if any(isinstance(e, cls) for cls in user_errors if isinstance(cls, type)):
            return _fail(str(e), EXIT_USAGE)
        raise


def _launcher_rank() -> int:
    """Rank announced by the launcher (torchrun or SLURM), readable before the process group exists."""
    for key in ("RANK", "SLURM_PROCID"):
        try:
            return int(os.environ[key])
        except KeyError:
            continue
        except ValueError:
            return 0
    return 0


def _fail(message: str, code: int) -> int:
    if _launcher_rank() == 0:
        line = " ".join(str(message).split())
        print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def run(args: argparse.Namespace, v: Dict[str, Any]) -> int:
    """Build everything from validated args and train (or --eval / --throughput). Returns the exit code."""
    import torch
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    import datasets
    import engine
    import losses
    import samplers
    import toe
    import utils

    utils.init_distributed_mode(args)
    rank, world = utils.get_rank(), utils.get_world_size()
    device = torch.device(args.device if not (args.distributed and args.device.startswith("cuda"))
                          else f"cuda:{args.gpu}")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    schedule = v["schedule"]
    use_toe = toe_enabled(args)
    print(json.dumps(utils.plain_args(args), sort_keys=True))

    # same initial weights on every rank; per-epoch seeds below make training resumable bitwise
    utils.seed_everything(args.seed)

    # ---------------------------------------------------------------- data
    if args.throughput:
        nb_classes = args.nb_classes
        dataset_train = dataset_val = None
    else:
        dataset_train, nb_classes = datasets.build_dataset(is_train=True, args=args)
        dataset_val, _ = datasets.build_dataset(is_train=False, args=args)
        if args.token_label:
            import token_label

            if args.token_label_data:
                dataset_train = token_label.build_token_label_dataset_from_args(args)
            else:  # FAKE without maps: deterministic synthetic maps
                dataset_train = token_label.SyntheticTokenLabels(dataset_train, nb_classes, args.token_label_size,
                                                                 seed=args.seed)
        if len(dataset_val) == 0:
            raise UsageError(f"the validation split of {args.data_set} is empty")

    # ---------------------------------------------------------------- model
    model = create_model(args.model, nb_classes, args.input_size, model_kwargs(args),
                         drop_rate=args.drop, drop_path_rate=args.drop_path)
    if v["finetune_ckpt"] is not None:
        fit = utils.adapt_state_dict_for_finetune(utils.model_state_from_checkpoint(v["finetune_ckpt"]), model)
        model.load_state_dict(fit["state"], strict=False)
        print(f"fine-tuning from {args.finetune}: re-initialised {fit['dropped'] or 'no head'}"
              f"{', pos_embed interpolated' if fit['resampled'] else ''}")
    if use_toe:
        toe.apply(model, schedule, layer=args.toe_layer, distance=args.toe_distance, init=args.toe_init,
                  expand=not args.toe_no_expand, merge=not args.toe_no_merge, sparse_eval=args.toe_sparse_eval)
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UsageError(f"model {args.model} does not support --grad-checkpointing")
        model.set_grad_checkpointing(True)
    if args.attn_only:
        _freeze_all_but_attention(model)
    if args.distillation_type != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # distilled DeiT returns (cls, dist) logits while training
    num_patches = _num_patches(model)
    flops_info: Dict[str, Any] = {"per_stage": {}, "baseline": None, "average": None, "speedup": None}
    if not args.eval and not args.throughput:
        # counted on CPU before moving the model; toe.flops works on its own deep copies
        global_batch_flops = args.batch_size * utils.get_world_size() * args.grad_accum_steps
        flops_info = gflops_table(model, schedule if use_toe else None, args.toe_layer, global_batch_flops,
                                  args.input_size)
        print(f"GFLOPs per iteration (global batch {global_batch_flops}): baseline {flops_info['baseline']}, "
              f"schedule average {flops_info['average']}, theoretical speedup {flops_info['speedup']}")
    model.to(device)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))

    # EMA after toe.apply: the deep copy carries its own ToE hook, driven by toe.set_epoch below
    model_ema = None
    if args.model_ema and not args.throughput:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
    ema_device = torch.device("cpu") if args.model_ema_force_cpu else device

    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"number of params: {n_parameters}")

    if args.compile:
        model = torch.compile(model)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)

    if args.throughput:
        start_epoch = args.start_epoch
        if use_toe:
            toe.set_epoch(model, start_epoch)
        fwd = engine.measure_throughput(model, device, args.batch_size, args.input_size, amp_dtype, train=False)
        trn = engine.measure_throughput(model, device, args.batch_size, args.input_size, amp_dtype, train=True)
        res = {"model": args.model, "batch_size": args.batch_size, "input_size": args.input_size,
               "eval_img_per_s": fwd, "train_img_per_s": trn,
               "toe_keep_rate": schedule.keep_rate(start_epoch) if use_toe else 1.0}
        print(json.dumps(res))
        return 0

    # ---------------------------------------------------------------- loaders
    if args.repeated_aug:
        sampler_train = samplers.RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True,
                                           num_repeats=args.ra_reps, seed=args.seed)
    elif args.distributed:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world, rank=rank,
                                                            shuffle=True, seed=args.seed)
    else:
        sampler_train = torch.utils.data.RandomSampler(dataset_train)
    if args.distributed and args.dist_eval:
        sampler_val = samplers.DistributedEvalSampler(dataset_val, num_replicas=world, rank=rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    loader_generator = torch.Generator()
    data_loader_train = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True, worker_init_fn=utils.seed_worker,
        generator=loader_generator)
    data_loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size), num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=False)
    if len(data_loader_train) == 0 and not args.eval:
        raise UsageError(f"the training set ({len(dataset_train)} images over {world} processes) is smaller than "
                         f"one batch of {args.batch_size}")

    mixup_fn = None
    # MixToken replaces mixup/cutmix under token labeling (mixing would break the label maps)
    mixup_active = (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None) and not args.token_label
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)

    # ---------------------------------------------------------------- optimisation
    global_batch = args.batch_size * world * args.grad_accum_steps
    if not args.unscale_lr:
        args.lr = args.lr * global_batch / 512.0
    opt_kwargs: Dict[str, Any] = {"eps": args.opt_eps}
    if args.opt_betas:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    try:
        optimizer = create_optimizer_v2(model_without_ddp, opt=args.opt, lr=args.lr,
                                        weight_decay=args.weight_decay, momentum=args.momentum, **opt_kwargs)
    except (ValueError, AssertionError) as e:
        raise UsageError(f"--opt {args.opt}: {e}") from None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    updates_per_epoch = max(len(data_loader_train) // args.grad_accum_steps, 1)
    noise = args.lr_noise
    noise = None if noise is None else (noise[0] if len(noise) == 1 else list(noise))
    try:
        lr_scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs,
            decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
            warmup_epochs=args.warmup_epochs, noise=noise, noise_pct=args.lr_noise_pct,
            noise_std=args.lr_noise_std, noise_seed=args.seed, updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise UsageError(f"--sched {args.sched}: {e}") from None
    if lr_scheduler is None:
        raise UsageError(f"unknown --sched '{args.sched}'")

    teacher = None
    if args.distillation_type != "none":
        teacher = create_model(args.teacher_model, nb_classes, args.input_size, dict(args.teacher_model_kwargs))
        tstate = utils.model_state_from_checkpoint(v["teacher_ckpt"])
        try:
            teacher.load_state_dict(tstate, strict=True)
        except RuntimeError as e:
            raise utils.CheckpointError(f"--teacher-path {args.teacher_path} does not fit --teacher-model "
                                        f"{args.teacher_model} with {nb_classes} classes: "
                                        f"{str(e).splitlines()[0] if str(e) else e}") from None
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if args.token_label:
        import token_label

        criterion = token_label.TokenLabelCriterion(args.cls_weight, args.dense_weight, args.smoothing)
    else:
        base_criterion = losses.build_base_criterion(mixup_active=mixup_active, smoothing=args.smoothing,
                                                     bce_loss=args.bce_loss)
        criterion = losses.DistillationLoss(base_criterion, teacher, args.distillation_type,
                                            args.distillation_alpha, args.distillation_tau)

    # ---------------------------------------------------------------- resume
    start_epoch = args.start_epoch
    max_accuracy = 0.0
    ckpt = v["resume_ckpt"]
    if ckpt is not None:
        mstate = utils.model_state_from_checkpoint(ckpt)
        try:
            model_without_ddp.load_state_dict(mstate, strict=True)
            if model_ema is not None:
                if ckpt.get("model_ema") is not None:
                    model_ema.module.load_state_dict(ckpt["model_ema"], strict=True)
                else:
                    model_ema.set(model_without_ddp)
        except RuntimeError as e:
            raise utils.CheckpointError(f"checkpoint {v['resume_path']} does not fit model {args.model}: "
                                        f"{str(e).splitlines()[0] if str(e) else e}") from None
        if not args.eval and "optimizer" in ckpt and "epoch" in ckpt:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
                if ckpt.get("lr_scheduler") is not None:
                    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
                if scaler is not None and ckpt.get("scaler") is not None:
                    scaler.load_state_dict(ckpt["scaler"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise utils.CheckpointError(f"checkpoint {v['resume_path']} does not fit these options "
                                            f"(optimizer/scheduler): {e}") from None
            if "rng" in ckpt:
                utils.set_rng_state(ckpt["rng"])
            start_epoch = int(ckpt["epoch"]) + 1
            max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        print(f"resumed from {v['resume_path']} (completed epoch {ckpt.get('epoch', '?')})")

    # ---------------------------------------------------------------- evaluation only
    if args.eval:
        if use_toe:
            toe.set_epoch(model, start_epoch if ckpt is None else int(ckpt.get("epoch", 0)))
            if model_ema is not None:
                toe.set_epoch(model_ema.module, start_epoch if ckpt is None else int(ckpt.get("epoch", 0)))
        reduce = args.distributed and args.dist_eval
        stats = engine.evaluate(data_loader_val, model, device, amp_dtype, reduce_across_ranks=reduce)
        res = {"test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"], "n": stats["n"]}
        if model_ema is not None and ckpt is not None and ckpt.get("model_ema") is not None:
            es = engine.evaluate(data_loader_val, model_ema.module, ema_device, amp_dtype,
                                 reduce_across_ranks=reduce, header="Test (EMA):")
            res["ema_test_acc1"] = es["acc1"]
        print(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.2f}%")
        print(json.dumps(res))
        return 0

    # ---------------------------------------------------------------- training
    out_dir = args.output_dir
    log_path = os.path.join(out_dir, "log.txt") if out_dir else ""
    writer = None
    if out_dir and utils.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        # the run's configuration next to its log, for scripts/summarize.py and humans
        utils.atomic_write_text(os.path.join(out_dir, "args.json"),
                                json.dumps(utils.plain_args(args), indent=1, sort_keys=True) + "\n")
        utils.truncate_log(log_path, start_epoch)
        if ckpt is not None and isinstance(ckpt.get("log_row"), dict):
            # the log line of the checkpoint's epoch is written before the checkpoint; restore it if lost
            if not any(r.get("epoch") == ckpt["epoch"] for r in utils.read_log(log_path)):
                utils.append_log(log_path, ckpt["log_row"])
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=os.path.join(out_dir, "tb"), purge_step=start_epoch)

    ckpt_path = os.path.join(out_dir, "checkpoint.pth") if out_dir else ""
    print(f"Start training for {args.epochs - start_epoch} epochs (epochs {start_epoch}..{args.epochs - 1}), "
          f"global batch {global_batch}, lr {args.lr:.3g}")
    total_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        # an epoch's randomness depends only on (seed, rank, epoch): resuming reproduces it exactly
        eseed = utils.epoch_seed(args.seed, rank, epoch)
        utils.seed_everything(eseed)
        loader_generator.manual_seed(eseed)
        if hasattr(sampler_train, "set_epoch"):
            sampler_train.set_epoch(epoch)
        stage = None
        if use_toe:
            toe.set_epoch(model, epoch)  # every rank derives the stage from the epoch: they agree
            if model_ema is not None:
                toe.set_epoch(model_ema.module, epoch)
            stage = schedule.stage(epoch)

        try:
            train_stats = engine.train_one_epoch(
                model, criterion, data_loader_train, optimizer, device, epoch, amp_dtype=amp_dtype, scaler=scaler,
                max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn,
                grad_accum_steps=args.grad_accum_steps, set_training_mode=args.train_mode,
                print_freq=args.print_freq)
        except engine.NonFiniteLossError as e:
            if os.path.isfile(ckpt_path):
                done = _checkpoint_epoch(ckpt_path)
                where = f"resume from {ckpt_path} (last completed epoch {done}) with --resume {ckpt_path}"
            else:
                where = "no checkpoint was written yet (restart from scratch)"
            return _fail(f"non-finite loss ({e.value}) at epoch {e.epoch}, iteration {e.iteration}/{e.total}; "
                         f"{where}, e.g. with a lower --lr or --clip-grad", EXIT_NONFINITE)
        # measured, not predicted: the sequence length ToE produced in the last training forward
        idx = toe.last_index(model) if use_toe else None
        tokens = int(idx.shape[1]) - num_prefix if idx is not None else num_patches

        reduce = args.distributed and args.dist_eval
        test_stats = engine.evaluate(data_loader_val, model, device, amp_dtype, reduce_across_ranks=reduce)
        ema_stats = None
        if model_ema is not None:
            ema_stats = engine.evaluate(data_loader_val, model_ema.module, ema_device, amp_dtype,
                                        reduce_across_ranks=reduce, header="Test (EMA):")
        lr_scheduler.step(epoch + 1, test_stats["acc1"])
        is_best = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.2f}% "
              f"(max {max_accuracy:.2f}%)")

        row: Dict[str, Any] = {
            "train_loss": train_stats["loss"], "train_lr": train_stats["lr"],
            "toe_stage": stage, "toe_keep_rate": schedule.keep_rate(epoch) if use_toe else 1.0,
            "toe_tokens": tokens, "num_patches": num_patches,
            "epoch_time": train_stats["epoch_time"], "train_img_per_s": train_stats["img_per_s"],
            "test_acc1": test_stats["acc1"], "test_acc5": test_stats["acc5"], "test_loss": test_stats["loss"],
            "test_images": test_stats["n"],
        }
        if ema_stats is not None:
            row["ema_test_acc1"] = ema_stats["acc1"]
        row.update({"max_accuracy": max_accuracy, "n_parameters": n_parameters,
                    "gflops_per_iter": flops_info["per_stage"].get(stage, flops_info["baseline"]) if use_toe
                    else flops_info["baseline"], "epoch": epoch,
                    "skipped_images": int(datasets.skipped_images(dataset_train))})

        if out_dir and utils.is_main_process():
            # log line first, then the checkpoint: a kill in between re-runs this epoch and the resume
            # truncates the line away, so each epoch is logged exactly once
            utils.append_log(log_path, row)
            extra = {"log_row": row}
            utils.save_checkpoint(ckpt_path, model=model_without_ddp, optimizer=optimizer,
                                  lr_scheduler=lr_scheduler, scaler=scaler, model_ema=model_ema, epoch=epoch,
                                  args=args, max_accuracy=max_accuracy, extra=extra)
            if is_best:
                utils.save_checkpoint(os.path.join(out_dir, "best_checkpoint.pth"), model=model_without_ddp,
                                      optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
                                      model_ema=model_ema, epoch=epoch, args=args, max_accuracy=max_accuracy,
                                      extra=extra)
            if writer is not None:
                for k, val in row.items():
                    if isinstance(val, (int, float)) and not isinstance(val, bool) and k != "epoch":
                        writer.add_scalar(_tb_name(k), val, epoch)
                writer.flush()
        if args.distributed:
            torch.distributed.barrier()  # no rank runs ahead of the checkpoint it may resume from

    if writer is not None:
        writer.close()
    total = time.time() - total_start
    print(f"Training time {time.strftime('%H:%M:%S', time.gmtime(total))}; max accuracy {max_accuracy:.2f}%")
    if args.distributed:
        torch.distributed.destroy_process_group()
    return 0


# ================================================================================================ helpers
def _tb_name(key: str) -> str:
    for prefix, group in (("train_", "train/"), ("test_", "test/"), ("ema_", "ema/"), ("toe_", "toe/")):
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return "misc/" + key


def _num_patches(model) -> int:
    pe = getattr(model, "patch_embed", None)
    n = getattr(pe, "num_patches", None)
    if n is None:
        grid = getattr(pe, "grid_size", None)
        n = int(grid[0] * grid[1]) if grid is not None else 0
    return int(n)


def _checkpoint_epoch(path: str) -> Any:
    import utils

    try:
        return utils.load_checkpoint_file(path).get("epoch", "?")
    except utils.CheckpointError:
        return "?"


def _freeze_all_but_attention(model) -> None:
    """--attn-only (DeiT III fine-tuning): train attention weights, the head and the embeddings only."""
    keep = ("head", "pos_embed", "patch_embed", "cls_token", "dist_token", "reg_token")
    for name, p in model.named_parameters():
        p.requires_grad_(".attn." in name or name.split(".")[0] in keep or name.startswith("head_dist"))


def gflops_table(model, schedule, layer: int, batch_size: int, img_size: int) -> Dict[str, Any]:
    """toe.flops' count (thop forward MACs x 3 x batch, the paper's way) for the baseline and each ToE stage.

    Returns {'per_stage': {stage: gflops}, 'baseline': gflops, 'average': gflops over the schedule,
    'speedup': theoretical}; values are None for models toe.flops cannot count (no ViT `blocks`).
    """
    from toe import flops

    try:
        res = flops.gflops_per_iteration(model, schedule, layer=layer, batch_size=batch_size, img_size=img_size)
    except (ValueError, RuntimeError) as e:
        print(f"warning: GFLOPs not counted for this model: {e}")
        return {"per_stage": {}, "baseline": None, "average": None, "speedup": None}
    return {"per_stage": {int(s["stage"]): float(s["gflops"]) for s in res["stages"]},
            "baseline": float(res["baseline"]["gflops"]), "average": float(res["gflops"]),
            "speedup": float(res["speedup"])}


if __name__ == "__main__":
    sys.exit(main())
