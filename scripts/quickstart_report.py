#!/usr/bin/env python
"""The quickstart's summary of OUT/baseline and OUT/toe (two main.py runs of one model, without and with ToE):
accuracy, training img/s and time (log.txt), GFLOPs per iteration, and the training-step time of each run.

usage: python scripts/quickstart_report.py OUT [--reps 7] [--warmup 1] [--settle 1]

Epoch img/s on a shared machine swing by tens of percent from run to run, so the speed ratio is taken from
step times instead: each run's training step (model, ToE schedule, batch, optimizer and AMP rebuilt from
its args.json) is timed in this one process, the baseline's and ToE's steps interleaved (runtime/steptime.py):
on CPU the process's CPU time with one thread, on CUDA the synchronised wall time; the median of --reps
steps after --warmup untimed rounds. ToE's step time is the mean, over the epochs it trained, of the median
step of the stage each epoch ran in (every epoch has the same number of steps).
Bad input (a run without a finished epoch or args.json): one `error:` line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime import runlog  # noqa: E402
from runtime.errors import EXIT_USAGE, CheckpointError, DataError, UsageError  # noqa: E402

RUNS = ("baseline", "toe")


def run_summary(run_dir: Path) -> Dict[str, Any]:
    """Final accuracy, epoch-weighted training img/s, training seconds, mean GFLOPs/iteration and the
    tokens of each epoch, from ``run_dir/log.txt``. UsageError when it holds no epoch."""
    rows = runlog.epoch_rows(str(run_dir / "log.txt"))
    if not rows:
        raise UsageError(f"{run_dir / 'log.txt'} holds no finished epoch (did the run fail?)")
    secs = sum(r["epoch_time"] for r in rows)
    gflops = [r["gflops_per_iter"] for r in rows if r.get("gflops_per_iter") is not None]
    return {"acc1": rows[-1]["test_acc1"], "acc5": rows[-1]["test_acc5"], "train_s": secs,
            "img_s": sum(r["train_img_per_s"] * r["epoch_time"] for r in rows) / secs,
            "gflops": sum(gflops) / len(gflops) if gflops else float("nan"),
            "tokens": "/".join(str(r["toe_tokens"]) for r in rows)}


def run_config(run_dir: Path) -> Any:
    """The run's config.Config, rebuilt from main.py's defaults and the flags its args.json records."""
    import config
    import main

    path = run_dir / "args.json"
    try:
        flags = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    args = main.get_args_parser().parse_args([])
    for key, value in flags.items():
        if hasattr(args, key):  # args.json also records resolved values (lr_scaled, global_batch, ...)
            setattr(args, key, value)
    return config.from_args(args)


def stage_epochs(cfg: Any) -> List[int]:
    """The ToE stage of each epoch the run trained (stage 0 for every epoch of a run without ToE)."""
    if cfg.toe is None:
        return [0] * cfg.run.epochs
    return [cfg.toe.schedule.stage(epoch) for epoch in range(cfg.run.epochs)]


def _step_configs(cfgs: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """{'baseline': step, 'toe stage s': step, ...}: one training step per configuration, for the stages
    the ToE run trained in, on a fixed random batch of the runs' size."""
    import torch

    from training import builders
    import datasets
    from runtime import steptime
    import toe

    amp_dtypes = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    steps = {}
    for name, cfg in cfgs.items():
        _, num_classes = datasets.build_dataset(False, cfg.data.spec, None)
        torch.manual_seed(cfg.run.seed)
        model, _ = builders.build_model(cfg.model, cfg.toe, num_classes, {})
        model.to(device).train()
        optimizer = builders.build_optimizer(model, cfg.optim, device.type)
        size = cfg.model.input_size
        images = torch.randn(cfg.data.batch_size, 3, size, size, device=device)
        labels = torch.randint(0, num_classes, (cfg.data.batch_size,), device=device)
        step = steptime.make_step(model, images, labels, optimizer=optimizer, amp_dtype=amp_dtypes[cfg.run.amp])
        if cfg.toe is None:
            steps[name] = step
            continue
        for stage in sorted(set(stage_epochs(cfg))):
            def run(model=model, step=step, start=cfg.toe.schedule.stage_starts()[stage - 1]) -> None:
                toe.set_epoch(model, start)
                step()
            steps[f"{name} stage {stage}"] = run
    return steps


def step_times(cfgs: Dict[str, Any], reps: int, warmup: int, settle: int = 1) -> Tuple[Dict[str, float], str]:
    """Each run's training-step time in seconds ({'baseline': s, 'toe': s}) and how it was measured."""
    import torch

    from runtime import steptime

    device = torch.device(cfgs["baseline"].run.device)
    clock = "cpu" if device.type == "cpu" else "wall"
    if clock == "cpu":
        torch.set_num_threads(1)  # CPU time over several threads would count their spin-waits too
    steps = _step_configs(cfgs, device)
    steptime.warm_up(steps, warmup)
    times = steptime.time_interleaved(steps, reps, settle=settle, device=device, clock=steptime.CLOCKS[clock])
    med = steptime.medians(times)
    out = {}
    for name, cfg in cfgs.items():
        stages = stage_epochs(cfg)
        out[name] = med[name] if cfg.toe is None else sum(med[f"{name} stage {s}"] for s in stages) / len(stages)
    timer = "CPU time (1 thread)" if clock == "cpu" else "CUDA-synchronised wall time"
    how = f"step ms: median of {reps} training steps after warm-up, {timer}, both runs interleaved in one process"
    return out, how


def format_report(summaries: Dict[str, Dict[str, Any]], step_s: Dict[str, float], how: str, out: Path) -> str:
    """The side-by-side table, the measurement line and the ToE/baseline ratios."""
    b, t = summaries["baseline"], summaries["toe"]
    lines = ["", f"{'run':<10}{'acc@1':>8}{'acc@5':>8}{'train img/s':>13}{'train s':>9}{'step ms':>9}"
                 f"{'GFLOPs/iter':>13}  tokens/epoch"]
    for label, name in (("baseline", "baseline"), ("ToE", "toe")):
        s = summaries[name]
        lines.append(f"{label:<10}{s['acc1']:>8.2f}{s['acc5']:>8.2f}{s['img_s']:>13.1f}{s['train_s']:>9.1f}"
                     f"{step_s[name] * 1e3:>9.1f}{s['gflops']:>13.3f}  {s['tokens']}")
    lines.append(how)
    lines.append(f"ToE/baseline: {step_s['baseline'] / step_s['toe']:.2f}x faster training step, "
                 f"{b['gflops'] / t['gflops']:.2f}x fewer GFLOPs")
    lines.append(f"more (best/final top-1, GPU hours, speed-ups): python scripts/summarize.py {out}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2
        self.exit(EXIT_USAGE, f"error: {message}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _Parser(prog="quickstart_report.py", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the quickstart's OUT: holds baseline/ and toe/")
    p.add_argument("--reps", type=int, default=7, help="timed steps per configuration (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every configuration first (default 1)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed steps of a configuration right before each of its timed steps (default 1)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.settle < 0:
        p.error(f"--reps must be >= 1, --warmup and --settle >= 0, got {args.reps}, {args.warmup} and {args.settle}")
    try:
        summaries = {name: run_summary(args.out / name) for name in RUNS}
        cfgs = {name: run_config(args.out / name) for name in RUNS}
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    step_s, how = step_times(cfgs, args.reps, args.warmup, args.settle)
    print(format_report(summaries, step_s, how, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
