"""Train or evaluate a DeiT-family ViT with Token Expansion (ToE, CVPR 2024). The command users run:

    python main.py --model deit_tiny_patch16_224 --data-path /imagenet --toe-r1 0.5 --toe-ng 3 --toe-k 2
    torchrun --nproc_per_node 4 main.py ... --batch-size 256

This file holds the flag list (DeiT's names and defaults, plus --toe-*) and the exit codes. The flags
become an immutable ``config.Config`` (config/), the pieces are built by training/builders.py / recipes.py, and
training/trainer.py runs the epochs. Bad input: one ``error: ...`` line on stderr, exit 2. A non-finite loss: one
line naming the epoch, the iteration and the checkpoint to resume from, exit 3. Ctrl-C or SIGTERM: one
``interrupted at ...`` line saying how to resume, exit 130.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from training.builders import parse_key_values
from runtime.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_USAGE, UsageError, fail

__all__ = ["main", "get_args_parser", "parse_key_values", "EXIT_USAGE", "EXIT_NONFINITE", "EXIT_INTERRUPTED"]


class _Parser(argparse.ArgumentParser):
    """Reports a parse error as UsageError (one line, exit 2) instead of usage text and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


class _KeyValues(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_key_values(values, option_string))
        except ValueError as e:
            raise UsageError(str(e)) from None


def _on_off(group, name: str, default: bool, help_on: str) -> None:
    """--NAME / --no-NAME pair writing one boolean."""
    dest = name.replace("-", "_")
    group.add_argument(f"--{name}", dest=dest, action="store_true", help=f"{help_on} (default: {'on' if default else 'off'})")
    group.add_argument(f"--no-{name}", dest=dest, action="store_false", help=f"turn --{name} off")
    group.set_defaults(**{dest: default})


def _add_core(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", default=64, type=int, help="images per process and micro-batch (default: 64)")
    parser.add_argument("--epochs", default=300, type=int, help="training epochs (default: 300)")
    parser.add_argument("--bce-loss", action="store_true", help="binary cross-entropy instead of softmax CE")
    parser.add_argument("--unscale-lr", action="store_true",
                        help="take --lr literally; by default it is multiplied by global batch / 512, where the "
                             "global batch counts every process and --grad-accum-steps")
    parser.add_argument("--grad-accum-steps", default=1, type=int,
                        help="micro-batches per optimizer step; global batch = batch-size x processes x this "
                             "(default: 1)")


def _add_model(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Model")
    g.add_argument("--model", default="deit_base_patch16_224", metavar="MODEL",
                   help="timm model name, or lvvit_t/s/m/l (default: deit_base_patch16_224)")
    g.add_argument("--input-size", default=224, type=int, help="square input side in px (default: 224)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_KeyValues, metavar="KEY=VALUE",
                   help="extra keyword arguments for timm.create_model, e.g. depth=6 embed_dim=192")
    g.add_argument("--patch-size", default=None, type=int, help="same as --model-kwargs patch_size=N")
    g.add_argument("--drop", type=float, default=0.0, metavar="P", help="dropout probability (default: 0)")
    g.add_argument("--drop-path", type=float, default=0.1, metavar="P",
                   help="stochastic depth rate of the last block (default: 0.1)")
    _on_off(g, "model-ema", True, "keep an exponential moving average of the weights and evaluate it too")
    g.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay per optimizer step "
                                                                         "(default: 0.99996)")
    g.add_argument("--model-ema-force-cpu", action="store_true", help="hold the EMA copy in CPU memory")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: one graph per ToE stage (and curriculum size) plus one for "
                        "evaluation")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile, e.g. eager or aot_eager to debug (default: inductor)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")


def _add_optimizer(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Optimizer")
    g.add_argument("--opt", default="adamw", metavar="NAME", help="timm optimizer name (default: adamw)")
    g.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPS",
                   help="small constant added to the denominator of Adam-type updates for numerical stability "
                        "(default: 1e-8)")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA",
                   help="optimizer betas (default: the optimizer's own)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the global gradient norm to NORM (default: no clipping)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M",
                   help="momentum factor of the SGD/momentum optimizers; other optimizers ignore it (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="decoupled weight decay (default: 0.05)")
    g.add_argument("--opt-impl", default="auto", choices=["auto", "fused", "foreach", "loop"],
                   help="torch optimizer kernel: auto = fused on CUDA for Adam/AdamW/SGD, else torch's default")


def _add_schedule(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Learning-rate schedule")
    g.add_argument("--sched", default="cosine", metavar="NAME", help="timm scheduler name (default: cosine)")
    g.add_argument("--lr", type=float, default=5e-4, metavar="LR",
                   help="peak learning rate per 512 images of global batch (default: 5e-4)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="FRACTION",
                   help="epochs (as fractions of the run, or absolute) where lr noise is on (default: none)")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="P", help="lr noise limit (default: 0.67)")
    g.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STD", help="lr noise std (default: 1.0)")
    g.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR", help="lr at the start of warm-up (default: 1e-6)")
    g.add_argument("--min-lr", type=float, default=1e-5, metavar="LR", help="floor of the decayed lr (default: 1e-5)")
    g.add_argument("--decay-epochs", type=float, default=30, metavar="N", help="step schedulers: epochs per decay (default: 30)")
    g.add_argument("--warmup-epochs", type=int, default=5, metavar="N", help="linear warm-up epochs (default: 5)")
    g.add_argument("--cooldown-epochs", type=int, default=10, metavar="N",
                   help="epochs at --min-lr after the schedule ends (default: 10)")
    _on_off(g, "train-cooldown", False, "train past --epochs for as many epochs as timm's scheduler lasts "
            "(cosine: + --cooldown-epochs at --min-lr), as LV-ViT's timm loop does; DeiT's stops at --epochs")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N",
                   help="plateau scheduler: epochs without progress before a decay (default: 10)")
    g.add_argument("--sched-on-updates", action="store_true",
                   help="step the schedule after every optimizer update instead of every epoch; cosine then is "
                        "EfficientTrain/BEiT's per-iteration cosine_scheduler (warm-up from --warmup-lr reaching "
                        "--lr at the last warm-up update, cosine over the remaining updates to --min-lr)")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE",
                   help="step/plateau schedulers: lr factor per decay (default: 0.1)")


def _add_augmentation(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Augmentation")
    g.add_argument("--color-jitter", type=float, default=0.3, metavar="S", help="colour-jitter strength (default: 0.3)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", metavar="POLICY",
                   help="timm auto-augment policy string; 'none' disables it (default: rand-m9-mstd0.5-inc1)")
    g.add_argument("--smoothing", type=float, default=0.1,
                   help="share of the target's probability spread evenly over all classes (default: 0.1)")
    g.add_argument("--train-interpolation", default="bicubic", help="resize filter in training (default: bicubic)")
    _on_off(g, "repeated-aug", True, "repeated augmentation: each image appears --ra-reps times per epoch, "
                                     "spread over processes")
    g.add_argument("--ra-reps", type=int, default=3, help="repeats per image of the repeated-aug sampler (default: 3)")
    _on_off(g, "train-mode", True, "keep dropout/drop-path in training mode during the training pass")
    g.add_argument("--ThreeAugment", action="store_true", help="DeiT III's 3-Augment instead of RandAugment")
    g.add_argument("--src", action="store_true",
                   help="DeiT III's crop: resize the short side, then a random square crop, no scale jitter")
    g.add_argument("--reprob", type=float, default=0.25, metavar="P", help="random-erasing probability (default: 0.25)")
    g.add_argument("--remode", default="pixel", help="random-erasing fill: pixel, rand or const (default: pixel)")
    g.add_argument("--recount", type=int, default=1, help="random-erasing regions per image (default: 1)")
    g.add_argument("--resplit", action="store_true",
                   help="not supported: it needs augmentation splits (AugMix/JSD), which this entry does not make")
    g.add_argument("--curriculum", default="none", choices=["none", "efficienttrain"],
                   help="input-size / RandAugment-magnitude curriculum over the epochs (Table 4); "
                        "efficienttrain: 5 phases at 5/7, 5/7, 5/7, 6/7, 1 of --input-size, m1..m9")
    g.add_argument("--curriculum-table", default=None, metavar="E:SIZE:M,...",
                   help="custom curriculum: start epoch, train size and RandAugment magnitude of each phase, "
                        "e.g. 0:160:1,60:160:3,120:160:5,180:192:7,240:224:9")
    g.add_argument("--curriculum-batch-scale", action="store_true",
                   help="in smaller-input phases, multiply the micro-batch by (final/phase size)^2 (rounded, a "
                        "divisor of --grad-accum-steps) and divide the accumulation steps by the same factor: "
                        "same global batch, fewer and fuller steps (EfficientTrain's 2x at 160 px)")
    g.add_argument("--curriculum-downsample", default="fourier", choices=["fourier", "resize"],
                   help="how a smaller phase gets its images: fourier = EfficientTrain's (augment at --input-size, "
                        "then keep the lowest frequencies on the device, toe.curriculum.frequency_crop); resize = "
                        "the loader crops straight to the phase size (default: fourier)")


def _add_mixup(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Mixup / CutMix")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha; 0 turns it off (default: 0.8)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha; 0 turns it off (default: 1.0)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None,
                   help="cutmix box ratio range, replaces the alpha (default: none)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="chance of mixing a batch (default: 1.0)")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="chance of cutmix instead of mixup when both are on (default: 0.5)")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
                   help="one mixing draw per batch, pair or element (default: batch)")


def _add_distillation(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Distillation")
    g.add_argument("--teacher-model", default="regnety_160", metavar="MODEL", help="teacher architecture (default: regnety_160)")
    g.add_argument("--teacher-path", default="", help="teacher weights (a checkpoint file)")
    g.add_argument("--teacher-model-kwargs", nargs="*", default={}, action=_KeyValues, metavar="KEY=VALUE",
                   help="extra timm.create_model arguments for the teacher")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"],
                   help="distill from the teacher's soft or argmax predictions (default: none)")
    g.add_argument("--distillation-alpha", default=0.5, type=float, help="weight of the distillation term (default: 0.5)")
    g.add_argument("--distillation-tau", default=1.0, type=float, help="soft distillation temperature (default: 1.0)")


def _add_token_labeling(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Token labeling (LV-ViT)")
    g.add_argument("--token-label", action="store_true", help="train lvvit_* models with dense token labels")
    g.add_argument("--token-label-data", default="", help="label maps <dir>/<class>/<image>.pt, [2, K, S, S] top-K "
                                                          "teacher logits and classes (FAKE: synthetic when empty)")
    g.add_argument("--token-label-size", default=14, type=int, help="label-map side, the patch grid side (default: 14)")
    g.add_argument("--token-label-target", default="reference", choices=["reference", "topk"],
                   help="dense target: reference = softmax over all classes of the zero-filled top-K logits, as "
                        "TokenLabeling; topk = softmax over the K stored logits only (default: reference)")
    g.add_argument("--token-label-gt", action="store_true",
                   help="mix the one-hot label into the class-token target (TokenLabeling's --ground-truth)")
    g.add_argument("--cls-weight", default=1.0, type=float, help="weight of the class-token loss (default: 1.0)")
    g.add_argument("--dense-weight", default=1.0, type=float, help="weight of the dense token loss (default: 1.0)")
    _on_off(g, "mix-token", True, "MixToken box mixing under --token-label")
    g.add_argument("--toe-dense-loss", default="merged", choices=["merged", "kept", "zero"],
                   help="with ToE: supervise each position through the token that carries it (merged), only "
                        "positions whose own token was kept (kept), or every position with zeros where ToE "
                        "removed the token, as the official ToE code (zero) (default: merged)")


def _add_finetune_and_data(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Fine-tuning")
    g.add_argument("--finetune", default="", help="start from these weights: classifier layers of another class "
                                                  "count are re-initialised and pos_embed is resampled")
    g.add_argument("--attn-only", action="store_true",
                   help="train only attention weights, embeddings and the head (DeiT III fine-tuning)")
    g = parser.add_argument_group("Data")
    g.add_argument("--data-path", default=None, help="data set root")
    g.add_argument("--data-set", default="IMNET", type=str.upper,
                   choices=["CIFAR10", "CIFAR100", "IMNET", "INAT18", "INAT19", "FOLDER", "FAKE"],
                   help="IMNET/FOLDER: train/ and val/ image folders; FAKE: synthetic, offline (default: IMNET)")
    g.add_argument("--inat-category", default="name",
                   choices=["kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name"],
                   help="iNaturalist label level (default: name)")
    g.add_argument("--fake-size", default=1000, type=int, help="FAKE: training images; validation gets a fifth (default: 1000)")
    g.add_argument("--nb-classes", default=10, type=int, help="FAKE: number of classes (default: 10)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="replace undecodable images by a neighbour and count them, instead of stopping")
    g.add_argument("--eval-crop-ratio", default=None, type=float,
                   help="centre-crop share of the resized eval image (default: the model's crop_pct, else 0.875)")
    g.add_argument("--num_workers", default=10, type=int, help="data loader processes per training process (default: 10)")
    g.add_argument("--data-backend", default="pil", choices=["pil", "dali"],
                   help="pil: torchvision/timm transforms in DataLoader workers (the paper's); dali: the same recipe "
                        "on NVIDIA DALI, decoded and augmented on the GPU (CPU-only with --device cpu), "
                        "--num_workers = its threads; needs requirements-dali.txt (default: pil)")
    _on_off(g, "pin-mem", True, "page-locked host batches for faster copies to the GPU")
    g.add_argument("--prefetch-factor", default=2, type=int, help="batches each loader worker prepares ahead (default: 2)")
    _on_off(g, "persistent-workers", False, "keep loader workers alive between epochs: saves their start-up "
                                            "each epoch, but their random streams then depend on where the run "
                                            "started, so a resumed run is no longer bitwise identical")


def _add_run(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Run")
    g.add_argument("--output_dir", default="", help="folder for log.txt, args.json, checkpoints and tb/ "
                                                     "(empty: write nothing)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--seed", default=0, type=int, help="base random seed (default: 0)")
    g.add_argument("--resume", default="auto", help="checkpoint to continue; 'auto': <output_dir>/checkpoint.pth "
                                                    "when present; 'none': start fresh (default: auto)")
    g.add_argument("--resume-changed-ok", action="store_true",
                   help="resume even though the model or a --toe-* flag differs from the checkpoint's run")
    g.add_argument("--overwrite", action="store_true",
                   help="start fresh in an --output_dir that holds an earlier run: its files are moved into "
                        "<output_dir>/old-<time>/ (nothing is deleted); without it such a start stops")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch of a fresh run (default: 0)")
    g.add_argument("--eval", action="store_true", help="evaluate the resumed or --finetune weights and exit")
    g.add_argument("--throughput", action="store_true", help="measure forward and training images/s and exit")
    g.add_argument("--dist-eval", action="store_true", help="split evaluation over processes (exact, no padding)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision: auto = fp16 with loss scaling on CUDA, none on CPU (default: auto)")
    g.add_argument("--print-freq", default=10, type=int, help="iterations between progress lines (default: 10)")
    g.add_argument("--world_size", default=None, type=int,
                   help="expected number of processes; checked against the launcher's (torchrun/SLURM)")
    g.add_argument("--dist_url", default="env://", help="torch.distributed init method (default: env://)")
    g.add_argument("--local_rank", "--local-rank", default=None, type=int,
                   help="GPU index on this node, given by torch.distributed.launch; torchrun's LOCAL_RANK wins")


def _add_toe(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Token Expansion (ToE)")
    g.add_argument("--toe-r1", type=float, default=None, help="keep rate r1 of stage 1; ToE is off without it")
    g.add_argument("--toe-ng", type=int, default=3, help="number of stages ng (default: 3)")
    g.add_argument("--toe-k", type=int, default=2, help="parallel expansion steps k per rate increment (default: 2)")
    g.add_argument("--toe-r0", type=float, default=None, help="seed keep rate r0 (default: r1 / 2)")
    g.add_argument("--toe-layer", type=int, default=1, help="block whose input is reduced; 0 = right after the "
                                                            "embedding (default: 1)")
    g.add_argument("--toe-distance", default="cosine", choices=["cosine", "euclidean", "manhattan"],
                   help="token distance of expansion and merging (default: cosine)")
    g.add_argument("--toe-init", default="spatial", choices=["spatial", "random"],
                   help="seed positions: evenly spaced or random (default: spatial)")
    g.add_argument("--toe-no-expand", action="store_true", help="ablation: take the stage's tokens from the seed step")
    g.add_argument("--toe-no-merge", action="store_true", help="ablation: drop unselected tokens instead of merging")
    g.add_argument("--toe-epochs", type=int, default=None, help="epochs the stages span (default: --epochs)")
    g.add_argument("--toe-stage-epochs", nargs="+", default=None, metavar="E",
                   help="0-based first epoch of each stage, e.g. '0 100 200' or '0,100,200'")
    g.add_argument("--toe-sparse-eval", action="store_true", help="reduce tokens at evaluation too")
    g.add_argument("--toe-compat", default="none", choices=["none", "official"],
                   help="none: the paper's equations; official: the official code's seeds, counts and max-distance "
                        "rule for euclidean/manhattan (reproduces Tables 3 and 9) (default: none)")


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag of main.py: DeiT's names and defaults, the --toe-* flags, and run-safety options."""
    parser = _Parser(prog="main.py", description="Train or evaluate a ViT with Token Expansion (ToE).")
    for add in (_add_core, _add_model, _add_optimizer, _add_schedule, _add_augmentation, _add_mixup,
                _add_distillation, _add_token_labeling, _add_finetune_and_data, _add_run, _add_toe):
        add(parser)
    return parser


def _user_error_types() -> tuple:
    from runtime import errors

    return (errors.UsageError, errors.CheckpointError, errors.DataError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, check, run. Returns the process exit code."""
    from runtime import interrupts

    with interrupts.stop_on_signals():
        try:
            args = get_args_parser().parse_args(argv)
            import config

            cfg = config.from_args(args)  # flag-only checks run before torch is imported
            from training import trainer

            return trainer.run(cfg)
        except _user_error_types() as e:
            return fail(str(e), EXIT_USAGE)
        except KeyboardInterrupt:  # before training began (trainer.run reports stops during it)
            return fail("interrupted before training started; nothing was written", EXIT_INTERRUPTED, prefix="")


if __name__ == "__main__":
    sys.exit(main())
