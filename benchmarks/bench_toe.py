#!/usr/bin/env python
"""Benchmark Token Expansion: the op's cost and the practical training speedup, against toe.flops.

Prints
  1. the selection op's time (``toe.token_expansion`` on the block-``layer`` input of the model, forward and
     forward + backward) and its share of a training step of the stage it runs in;
  2. the training-step time (forward + backward + AdamW step) of every ToE stage and of the full-token
     baseline, measured in the same process with interleaved repetitions (medians);
  3. the practical speedup over the schedule, sum_s L_s t_base / sum_s L_s t_s (L_s = stage lengths in
     epochs), next to the theoretical speedup of ``toe.flops.gflops_per_iteration``.

With ``--compile`` it also times torch.compile'd copies of the baseline and of the patched model, interleaved
with the eager ones, and prints their step times next to the eager ones with the number of compiled graphs
(ToE should add one per stage, whatever the number of calls).

This is a benchmark that prints numbers, not a test. Example (the issue's target setting):

    python benchmarks/bench_toe.py --model deit_tiny_patch16_224 --batch-size 32 --img-size 224 --threads 2

``--family`` times a family's default model instead of ``--model``'s (``timm``: DeiT-tiny; ``timm-eva``:
EVA-02-tiny, rotary embeddings, 256 patches at 224 px; ``torchvision`` and ``transformers``: a DeiT-tiny-sized
torchvision ``VisionTransformer`` and transformers ``ViTForImageClassification``, from benchmarks/families.py).
Blocks and prefix tokens come from ``toe.families``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's `toe`

from runtime import steptime  # noqa: E402
import toe  # noqa: E402
from toe.families import resolve  # noqa: E402
from toe.flops import create_model, gflops_per_iteration  # noqa: E402


# --family -> the model it times by default (timm names, or benchmarks/families.py's for the other libraries)
FAMILY_MODELS = {"timm": "deit_tiny_patch16_224", "timm-eva": "eva02_tiny_patch14_224",
                 "torchvision": "torchvision_vit_tiny", "transformers": "hf_vit_tiny"}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = _ArgumentParser(prog="bench_toe.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help=f"timm model name (default: the --family's, {FAMILY_MODELS})")
    p.add_argument("--family", default=None, choices=sorted(FAMILY_MODELS),
                   help="time this family's default model (default: timm); give --model or --family, not both")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=10, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed steps of the same configuration right before each timed step, so that every "
                        "timed step follows a step of its own shape, as in training (CPU allocator state)")
    p.add_argument("--op-reps", type=int, default=30, help="timed calls of the op per stage")
    p.add_argument("--toe-r1", type=float, default=0.5)
    p.add_argument("--toe-r0", type=float, default=None)
    p.add_argument("--toe-ng", type=int, default=3)
    p.add_argument("--toe-k", type=int, default=2)
    p.add_argument("--toe-layer", type=int, default=1)
    p.add_argument("--epochs", type=int, default=300, help="schedule length (only the stage weights matter)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time over all its threads, which other "
                        "jobs on a shared machine barely change (use with --threads 1; CPU only)")
    p.add_argument("--amp", action="store_true", help="autocast: bf16 on CPU, fp16 + GradScaler on CUDA")
    p.add_argument("--profile-op", action="store_true", help="print torch.profiler's table for the op")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd copies of the baseline and the patched model")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for --compile (e.g. inductor, aot_eager, eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = p.parse_args(argv)
    if args.model is not None and args.family is not None:
        p.error("give --model or --family, not both")
    args.model = args.model or FAMILY_MODELS[args.family or "timm"]
    for name in ("batch_size", "img_size", "reps", "op_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.settle < 0:
        p.error(f"--warmup and --settle must be >= 0, got {args.warmup} and {args.settle}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures CPU time and cannot time CUDA work; use --clock wall")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


CLOCK = time.perf_counter


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    return steptime.timed(fn, device, CLOCK)


def build_model(family: Optional[str], name: str, img_size: int) -> torch.nn.Module:
    """The timed model: a timm model by name, or benchmarks/families.py's model of a non-timm family."""
    if family in ("torchvision", "transformers"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import families

        return dict((n, m) for n, m, _ in families.build(family, img_size))[name]
    return create_model(name, img_size=img_size, num_classes=1000)  # EVA-02 defaults to no head


def make_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: bool) -> Callable[[], None]:
    """One training iteration on a fixed batch: forward, cross-entropy, backward, AdamW step (steptime's);
    ``amp``: autocast in bfloat16 on CPU, float16 with a GradScaler on CUDA."""
    amp_dtype = (torch.float16 if images.device.type == "cuda" else torch.bfloat16) if amp else None
    return steptime.make_step(model, images, labels, amp_dtype=amp_dtype)


def blocks_of(model: torch.nn.Module):
    """The model's blocks as its ToE family sees them (ValueError for a model ToE cannot patch)."""
    inner = toe.unwrap_model(model)
    return resolve(inner).blocks(inner)


def block_input(model: torch.nn.Module, images: torch.Tensor, layer: int, amp: bool) -> torch.Tensor:
    """The real input of block ``layer`` [B, N, C] for ``images`` (train mode, no ToE)."""
    captured: List[torch.Tensor] = []
    handle = blocks_of(model)[layer].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    dtype = torch.float16 if images.device.type == "cuda" else torch.bfloat16
    try:
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=amp):
            model(images)
    finally:
        handle.remove()
    return captured[0]


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compiled_configs(compiled_plain: torch.nn.Module, compiled_patched: torch.nn.Module, starts: List[int],
                     images: torch.Tensor, labels: torch.Tensor, amp: bool) -> Dict[str, Callable[[], None]]:
    """Step functions of the compiled baseline and of every stage of the compiled patched model."""
    configs = {"baseline compiled": make_step(compiled_plain, images, labels, amp)}
    step = make_step(compiled_patched, images, labels, amp)
    for s, start in enumerate(starts, 1):
        def run(start: int = start) -> None:
            toe.set_epoch(compiled_patched, start)  # switches between cached per-stage graphs
            step()
        configs[f"stage {s} compiled"] = run
    return configs


def report_compiled(med: Dict[str, float], times: Dict[str, List[float]], theory: Dict[str, Any],
                    lengths: List[int], backend: str, graphs: int, graphs_in_reps: int) -> Dict[str, Any]:
    """Print compiled step times next to the eager ones; return them for --json."""
    rows = [("baseline", theory["baseline"]["tokens"])] + [
        (f"stage {s}", st["tokens"]) for s, st in enumerate(theory["stages"], 1)]
    base = med["baseline compiled"]
    print(f"\ntorch.compile (backend {backend}): {graphs} graphs compiled in warmup for baseline + "
          f"{len(rows) - 1} stages, {graphs_in_reps} more during the timed reps")
    print(f"  {'':<10} {'tokens':>6} {'eager ms':>9} {'compiled':>9} {'min ms':>9} {'c/eager':>8} {'speedup':>8}")
    out: Dict[str, Any] = {"backend": backend, "graphs": graphs, "graphs_in_reps": graphs_in_reps, "rows": []}
    for name, tokens in rows:
        eager, compiled = med[name], med[f"{name} compiled"]
        print(f"  {name:<10} {tokens:>6} {eager * 1e3:>9.1f} {compiled * 1e3:>9.1f} "
              f"{min(times[f'{name} compiled']) * 1e3:>9.1f} {compiled / eager:>8.3f} {base / compiled:>7.3f}x")
        out["rows"].append({"config": name, "tokens": tokens, "eager_step_s": eager, "compiled_step_s": compiled,
                            "speedup_vs_compiled_baseline": base / compiled})
    mean_step = sum(L * med[f"stage {s} compiled"] for s, L in enumerate(lengths, 1)) / sum(lengths)
    out["practical_speedup"] = base / mean_step
    print(f"  compiled practical speedup over the schedule {base / mean_step:.3f}x (compiled baseline "
          f"{base * 1e3:.1f} ms, schedule-weighted compiled step {mean_step * 1e3:.1f} ms)")
    return out


def _models(args: argparse.Namespace, schedule: "toe.Schedule", plain: torch.nn.Module, device: torch.device):
    """Fresh copies of the same weights: the baseline, the ToE-patched model, and their compiled twins."""
    plain = plain.to(device).train()
    patched = toe.apply(copy.deepcopy(plain), schedule, layer=args.toe_layer).train()
    compiled = None
    if args.compile:
        # Dynamo skips guards on module hooks by default, so the patched model (same class as the baseline)
        # would silently run the baseline's graph, without ToE. Guarding on hooks tells the two apart.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        compiled = (torch.compile(copy.deepcopy(plain), backend=args.compile_backend),
                    torch.compile(toe.apply(copy.deepcopy(plain), schedule, layer=args.toe_layer).train(),
                                  backend=args.compile_backend))
    return copy.deepcopy(plain), patched, compiled


def _step_configs(args, schedule, plain, patched, compiled, images, labels) -> Dict[str, Callable[[], None]]:
    """One training-step callable per timed configuration: baseline, every stage (and compiled twins)."""
    starts = [sum(schedule.stage_lengths()[:i]) for i in range(schedule.ng)]
    configs: Dict[str, Callable[[], None]] = {"baseline": make_step(plain, images, labels, args.amp)}
    patched_step = make_step(patched, images, labels, args.amp)
    for s, start in enumerate(starts, 1):
        def run(start: int = start) -> None:
            toe.set_epoch(patched, start)
            patched_step()
        configs[f"stage {s}"] = run
    if compiled is not None:
        configs.update(compiled_configs(compiled[0], compiled[1], starts, images, labels, args.amp))
    return configs


def _time_configs(args, configs: Dict[str, Callable[[], None]], device: torch.device):
    """Interleaved, order-rotated timing of every configuration. Returns (times, graphs compiled in warmup,
    graphs compiled during the timed reps)."""
    names = list(configs)
    for warm in range(max(args.warmup, 1 if args.compile else 0)):
        # compiled configurations always warm up once: compiling must not be timed
        steptime.warm_up({n: configs[n] for n in names if warm < args.warmup or n.endswith(" compiled")})
    graphs_after_warmup = _unique_graphs() if args.compile else 0

    def report(rep: int, times: Dict[str, List[float]]) -> None:
        print(f"rep {rep + 1}/{args.reps}: " + "  ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names),
              file=sys.stderr, flush=True)

    times = steptime.time_interleaved(configs, args.reps, settle=args.settle, device=device, clock=CLOCK,
                                      on_round=report)
    graphs_in_reps = _unique_graphs() - graphs_after_warmup if args.compile else 0
    return times, graphs_after_warmup, graphs_in_reps


def _measure_op(args, schedule, plain, images, med: Dict[str, float], device: torch.device):
    """The op alone on the real block-`layer` input, per reducing stage. Returns (input, rows)."""
    x = block_input(plain, images, args.toe_layer, args.amp)
    prefix = resolve(toe.unwrap_model(plain)).num_prefix_tokens(toe.unwrap_model(plain))
    op_rows = []
    for s in range(1, schedule.ng + 1):
        rates = schedule.rates(s)
        if rates[-1] >= 1.0:
            continue
        xg = x.clone().requires_grad_(True)

        def op_forward() -> torch.Tensor:
            return toe.token_expansion(xg, rates, schedule.k, num_prefix_tokens=prefix)[0]

        def op_forward_backward() -> None:
            out = op_forward()
            out.backward(torch.ones_like(out))

        for _ in range(3):
            op_forward_backward()
        fwd = statistics.median(_timed(op_forward, device) for _ in range(args.op_reps))
        fwd_bwd = statistics.median(_timed(op_forward_backward, device) for _ in range(args.op_reps))
        op_rows.append({"stage": s, "rates": [round(r, 4) for r in rates], "forward_s": fwd,
                        "forward_backward_s": fwd_bwd, "share_of_step": fwd_bwd / med[f"stage {s}"]})
        if args.profile_op and s == 1:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(10):
                    op_forward_backward()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return x, op_rows


def _report_steps(args, theory, times, med, lengths) -> List[Dict[str, Any]]:
    base = med["baseline"]
    print(f"\ntraining step (forward + backward + AdamW), median of {args.reps} interleaved reps "
          f"(warmup {args.warmup}, {args.settle} untimed step(s) of the same configuration before each):")
    print(f"  {'':<10} {'tokens':>6} {'step ms':>9} {'min ms':>9} {'speedup':>8} {'theory':>7}")
    print(f"  {'baseline':<10} {theory['baseline']['tokens']:>6} {base * 1e3:>9.1f} "
          f"{min(times['baseline']) * 1e3:>9.1f} {1.0:>7.3f}x {1.0:>6.3f}x")
    stage_rows = []
    for s, st in enumerate(theory["stages"], 1):
        t = med[f"stage {s}"]
        th = theory["baseline"]["gflops"] / st["gflops"]
        stage_rows.append({"stage": s, "tokens": st["tokens"], "epochs": lengths[s - 1], "step_s": t,
                           "speedup": base / t, "theoretical": th})
        print(f"  {f'stage {s}':<10} {st['tokens']:>6} {t * 1e3:>9.1f} {min(times[f'stage {s}']) * 1e3:>9.1f} "
              f"{base / t:>7.3f}x {th:>6.3f}x")
    return stage_rows


def _report_speedup(args, theory, times, med, lengths, worst_share: float) -> Dict[str, float]:
    base = med["baseline"]
    mean_step = sum(L * med[f"stage {s}"] for s, L in enumerate(lengths, 1)) / sum(lengths)
    practical = base / mean_step
    ratio = practical / theory["speedup"]
    # Same estimate within each interleaved round, then the median over rounds: robust to load drifting
    # between rounds on a shared machine.
    paired = statistics.median(
        times["baseline"][i] * sum(lengths) / sum(L * times[f"stage {s}"][i] for s, L in enumerate(lengths, 1))
        for i in range(args.reps))
    # From the fastest step of each configuration: other jobs on the machine only ever add time.
    practical_min = min(times["baseline"]) * sum(lengths) / sum(
        L * min(times[f"stage {s}"]) for s, L in enumerate(lengths, 1))
    print(f"\nschedule-weighted step {mean_step * 1e3:.1f} ms vs baseline {base * 1e3:.1f} ms")
    print(f"practical speedup {practical:.3f}x (median of per-round speedups {paired:.3f}x, from minima "
          f"{practical_min:.3f}x)   theoretical (toe.flops) {theory['speedup']:.3f}x   "
          f"practical / theoretical = {ratio:.3f}")
    print(f"targets: op < 1% of a step: {'met' if worst_share < 0.01 else 'NOT met'} "
          f"({100 * worst_share:.2f}%); practical >= 0.97 x theoretical: {'met' if ratio >= 0.97 else 'NOT met'} "
          f"({ratio:.3f})")
    return {"practical_speedup": practical, "practical_speedup_paired": paired,
            "practical_speedup_min": practical_min, "ratio": ratio}


def main(argv: Optional[List[str]] = None) -> int:
    global CLOCK
    args = parse_args(argv)
    CLOCK = steptime.CLOCKS[args.clock]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    try:
        schedule = toe.Schedule(r1=args.toe_r1, ng=args.toe_ng, k=args.toe_k, r0=args.toe_r0, epochs=args.epochs)
        plain = build_model(args.family, args.model, args.img_size)
        depth = len(blocks_of(plain))
        if not (0 <= args.toe_layer < depth):
            raise ValueError(f"--toe-layer must be in [0, {depth - 1}], got {args.toe_layer}")
    except (ValueError, ImportError) as err:
        print(f"bench_toe.py: error: {err}", file=sys.stderr)
        return 2

    theory = gflops_per_iteration(plain, schedule, layer=args.toe_layer, batch_size=args.batch_size,
                                  img_size=args.img_size)
    plain, patched, compiled = _models(args, schedule, plain, device)
    num_classes = getattr(plain, "num_classes", 1000)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, num_classes, (args.batch_size,), device=device)

    print(f"model {args.model}  batch {args.batch_size}  img {args.img_size}  device {device}  "
          f"threads {torch.get_num_threads()}  amp {args.amp}  clock {args.clock}  torch {torch.__version__}")
    print(f"ToE r1={schedule.r1:g} r0={schedule.r0:g} ng={schedule.ng} k={schedule.k} layer={args.toe_layer}; "
          f"stage lengths {list(schedule.stage_lengths())} epochs")
    if args.compile:
        print(f"torch.compile backend {args.compile_backend}: compiled configurations are timed interleaved with "
              f"the eager ones; compilation happens in the untimed warmup")

    configs = _step_configs(args, schedule, plain, patched, compiled, images, labels)
    times, graphs_after_warmup, graphs_in_reps = _time_configs(args, configs, device)
    med = {name: statistics.median(v) for name, v in times.items()}
    x, op_rows = _measure_op(args, schedule, plain, images, med, device)

    print(f"\nop toe.token_expansion on the block-{args.toe_layer} input {list(x.shape)} {x.dtype} "
          f"(median of {args.op_reps}):")
    for row in op_rows:
        print(f"  stage {row['stage']} rates {row['rates']}: forward {row['forward_s'] * 1e3:.2f} ms, "
              f"forward+backward {row['forward_backward_s'] * 1e3:.2f} ms = "
              f"{100 * row['share_of_step']:.2f}% of the stage's training step")
    worst_share = max((r["share_of_step"] for r in op_rows), default=0.0)
    lengths = list(schedule.stage_lengths())
    stage_rows = _report_steps(args, theory, times, med, lengths)
    compiled_summary = (report_compiled(med, times, theory, lengths, args.compile_backend, graphs_after_warmup,
                                        graphs_in_reps) if args.compile else None)
    speed = _report_speedup(args, theory, times, med, lengths, worst_share)
    if args.json:
        print(json.dumps({"model": args.model, "batch_size": args.batch_size, "img_size": args.img_size,
                          "device": str(device), "threads": torch.get_num_threads(), "amp": args.amp,
                          "clock": args.clock, "baseline_step_s": med["baseline"], "stages": stage_rows,
                          "op": op_rows, **speed, "theoretical_speedup": theory["speedup"], "times_s": times,
                          "compiled": compiled_summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
