#!/usr/bin/env python
"""Benchmark the DeiT training input pipeline: can the data loader keep up with a ToE training step?

Measures, on a real JPEG folder (``--data-path``, an ImageFolder root with train/) or on the FAKE set:
  1. per image, in this process: decode, then each step of the DeiT training transform (RandomResizedCrop,
     flip, RandAugment, to-tensor + normalise, random erasing), and mixup/CutMix per batch;
  2. loader images/s for each ``--workers`` count (DataLoader + mixup/CutMix in the loop, no model), medians
     over ``--repeats``;
  3. the loader workers per GPU that a training rate ``--train-img-per-s`` needs, from the per-worker rate;
  4. the cheap settings as on/off rows: persistent_workers (time to the first batch of the 2nd epoch),
     prefetch_factor, pin_memory + non_blocking copies (CUDA only);
  5. with ``--backend pil dali``: the full training pipeline of each --data-backend side by side, img/s per
     core (and, for DALI on CUDA, per GPU); see benchmarks/backends.py.

    python benchmarks/bench_data.py --data-path /work/shared/data/imagenette-mini-64 --input-size 224 \
        --workers 1 2 --train-img-per-s "ToE stage 1 of DeiT-tiny=2500"

Exit codes: 0 after a run, 2 with one ``error:`` line for bad arguments or unreadable data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's datasets.py, from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # backends.py beside this file

import datasets  # noqa: E402
import data_report  # noqa: E402

PROG = "bench_data.py"
DEIT_AA = "rand-m9-mstd0.5-inc1"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage block would hide the reason; print one line
        self.exit(2, f"{PROG}: error: {message}\n")


def _rate(text: str) -> Tuple[str, float]:
    """'LABEL=IMG_PER_S' or 'IMG_PER_S' -> (label, rate); the label may contain spaces and '='."""
    label, sep, value = text.rpartition("=")
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LABEL=IMG_PER_S or IMG_PER_S, got '{text}'") from None
    if not math.isfinite(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(f"the training rate must be > 0 img/s, got '{text}'")
    return (label.strip() if sep and label.strip() else "training"), rate


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", help="ImageFolder root holding train/<class>/<image>")
    src.add_argument("--fake-size", type=int,
                     help="use main.py's FAKE set of this many images (generated at --input-size) instead")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--aa", default=DEIT_AA, help="RandAugment policy ('none' to disable)")
    p.add_argument("--batch-size", type=int, default=64, help="even (mixup/CutMix pairs a batch with its flip)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="DataLoader worker counts to measure (0: load in this process); default 1 2 <cores>")
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader run, after the first round")
    p.add_argument("--repeats", type=int, default=3, help="loader runs per setting (medians are reported)")
    p.add_argument("--per-image", type=int, default=64, help="images timed one by one for the breakdown")
    p.add_argument("--train-img-per-s", type=_rate, nargs="*", default=[], metavar="[LABEL=]IMG_PER_S",
                   help="training rates per GPU to size the loader for, e.g. 'ToE stage 1 of DeiT-tiny=2500'")
    p.add_argument("--wins-workers", type=int, default=None,
                   help="worker count for the on/off rows (default: the largest --workers value, at least 1)")
    p.add_argument("--prefetch-factors", type=int, nargs="+", default=[2, 4])
    p.add_argument("--no-wins", action="store_true", help="skip the on/off rows")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where batches go and mixup runs, as in training (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end with one JSON line of all the figures")
    p.add_argument("--backend", nargs="+", choices=["pil", "dali"], default=[],
                   help="also time the full training pipeline of these --data-backend values side by side")
    p.add_argument("--dali-threads", type=int, default=4, help="DALI threads of the GPU pipeline row (default: 4)")
    p.add_argument("--only-backends", action="store_true", help="with --backend: skip sections 1-4")
    args = p.parse_args(argv)
    cores = usable_cores()
    if args.workers is None:
        args.workers = sorted({1, 2, cores})
    checks = [("--input-size", args.input_size, 1), ("--batch-size", args.batch_size, 2),
              ("--batches", args.batches, 1), ("--repeats", args.repeats, 1), ("--per-image", args.per_image, 1)]
    checks += [("--workers", w, 0) for w in args.workers] + [("--prefetch-factors", f, 1) for f in
                                                             args.prefetch_factors]
    if args.fake_size is not None:
        checks.append(("--fake-size", args.fake_size, 1))
    for name, value, least in checks:
        if value < least:
            p.error(f"{name} must be >= {least}, got {value}")
    if args.batch_size % 2:
        p.error(f"--batch-size must be even for mixup/CutMix, got {args.batch_size}")
    if args.wins_workers is None:
        args.wins_workers = max(max(args.workers), 1)
    elif args.wins_workers < 1:
        p.error(f"--wins-workers must be >= 1, got {args.wins_workers}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    args.workers = list(dict.fromkeys(args.workers))  # keep the order, drop repeats
    return args


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def deit_augment(input_size: int, aa: str) -> datasets.AugmentConfig:
    """DeiT's training recipe (main.py's defaults) at ``input_size``."""
    return datasets.AugmentConfig(input_size=input_size, aa=aa, color_jitter=0.3, train_interpolation="bicubic",
                                  reprob=0.25, remode="pixel", recount=1, three_augment=False,
                                  simple_random_crop=False, eval_crop_ratio=0.875)


def deit_mixup(num_classes: int) -> Any:
    """timm Mixup with DeiT's settings: mixup 0.8, CutMix 1.0, always on, switch 0.5, per batch, smoothing 0.1."""
    from timm.data import Mixup

    return Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=0.1, num_classes=num_classes)


def load_data(args: argparse.Namespace) -> Tuple[Dataset, int, Callable[[int], Any], Callable]:
    """(train set with the DeiT transform, classes, raw image i -> PIL (decode or generate), the transform)."""
    transform = datasets.build_transform(True, deit_augment(args.input_size, args.aa))
    if args.fake_size is not None:
        # main.py makes FAKE images at the training size
        spec = datasets.DataSpec(name="FAKE", path=None, skip_bad_images=False, fake_size=args.fake_size,
                                 fake_image_size=args.input_size)
    else:
        spec = datasets.DataSpec(name="FOLDER", path=args.data_path, skip_bad_images=False)
    dataset, num_classes = datasets.build_dataset(True, spec, transform)
    if hasattr(dataset, "samples"):  # ImageFolder: decode the file
        def raw(i: int) -> Any:
            return dataset.loader(dataset.samples[i][0])
    else:  # FAKE: the image is generated
        raw = dataset.image
    return dataset, num_classes, raw, transform


def _time(fn: Callable[[], Any]) -> Tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def per_image_breakdown(raw: Callable[[int], Any], transform: Callable, size: int, count: int,
                        repeats: int, first_step: str = "decode") -> Dict[str, Any]:
    """Milliseconds per image of decoding (``first_step``: FAKE images are generated instead) and of each
    transform step, in this process (median of repeats)."""
    steps = list(getattr(transform, "transforms", [transform]))
    names = [first_step] + [type(s).__name__ for s in steps]
    indices = [i * size // min(count, size) for i in range(min(count, size))]  # spread over the classes
    totals: List[List[float]] = [[] for _ in names]
    for _ in range(repeats):
        sums = [0.0] * len(names)
        for i in indices:
            dt, x = _time(lambda: raw(i))
            sums[0] += dt
            for k, step in enumerate(steps, 1):
                dt, x = _time(lambda: step(x))
                sums[k] += dt
        for k, total in enumerate(sums):
            totals[k].append(1e3 * total / len(indices))
    ms = {name: statistics.median(v) for name, v in zip(names, totals)}
    full = sum(ms.values())
    return {"images": len(indices), "steps_ms": ms, "decode_ms": ms[first_step], "full_ms": full,
            "decode_img_per_s": 1e3 / ms[first_step], "full_img_per_s": 1e3 / full}


def mixup_cost(mixup: Any, batch_size: int, size: int, num_classes: int, device: torch.device,
               repeats: int) -> float:
    """Seconds for mixup/CutMix of one batch [B, 3, S, S] on ``device`` (median)."""
    images = torch.randn(batch_size, 3, size, size, device=device)
    targets = torch.randint(0, num_classes, (batch_size,), device=device)
    times = []
    for _ in range(max(repeats, 3) + 1):
        batch = images.clone()  # mixup works in place
        _sync(device)
        dt, _ = _time(lambda: mixup(batch, targets))
        _sync(device)
        times.append(dt)
    return statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(dataset: Dataset, batch_size: int, num_batches: int, workers: int, seed: int,
                persistent: bool = False, prefetch: Optional[int] = None, pin: bool = False) -> DataLoader:
    """A shuffled loader that yields exactly ``num_batches`` full batches per epoch (images repeat as needed)."""
    sampler = RandomSampler(dataset, num_samples=num_batches * batch_size,
                            generator=torch.Generator().manual_seed(seed))
    extra: Dict[str, Any] = {"persistent_workers": persistent} if workers > 0 else {}
    if workers > 0 and prefetch is not None:
        extra["prefetch_factor"] = prefetch
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin, **extra)


def run_epoch(loader: DataLoader, consume: Callable[[Any], None], skip: int) -> Tuple[float, float]:
    """One epoch: (seconds to the first batch, steady images/s after the first ``skip`` batches).

    With w workers the first w batches are made at once while the workers start, so the steady rate is
    timed from the arrival of batch ``skip`` = w to the last one.
    """
    start = time.perf_counter()
    first = anchor = None
    images = 0
    for i, batch in enumerate(loader):
        consume(batch)
        now = time.perf_counter()
        if i == 0:
            first = now - start
        if i == skip - 1:
            anchor = now
        elif i >= skip:
            images += batch[0].shape[0]
    end = time.perf_counter()
    return first, images / max(end - anchor, 1e-9)


def make_consumer(mixup: Any, device: torch.device, non_blocking: bool) -> Callable[[Any], None]:
    """What the training loop does with a batch before the model: copy to the device, mixup/CutMix."""
    def consume(batch: Any) -> None:
        images = batch[0].to(device, non_blocking=non_blocking)
        targets = batch[1].to(device, non_blocking=non_blocking)
        mixup(images, targets)
        _sync(device)  # the training step synchronises every iteration too

    return consume


def loader_rates(dataset: Dataset, args: argparse.Namespace, settings: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Median steady images/s and time to the first batch of each setting over ``args.repeats`` fresh loaders.

    A setting is {'workers': w, 'consume': fn, **make_loader options}. The settings take turns within each
    repeat, starting from a different one each time, so that load from other jobs drifting over the run
    spreads over all of them instead of biasing the one measured last.
    """
    rates: List[List[float]] = [[] for _ in settings]
    firsts: List[List[float]] = [[] for _ in settings]
    order = list(range(len(settings)))
    for rep in range(args.repeats):
        for k in order[rep % len(order):] + order[:rep % len(order)]:
            options = dict(settings[k])
            workers, consume = options.pop("workers"), options.pop("consume")
            skip = max(workers, 1)
            loader = make_loader(dataset, args.batch_size, skip + args.batches, workers, args.seed + rep,
                                 **options)
            first, rate = run_epoch(loader, consume, skip)
            rates[k].append(rate)
            firsts[k].append(first)
    return [{"workers": setting["workers"], "img_per_s": statistics.median(rates[k]), "img_per_s_runs": rates[k],
             "first_batch_s": statistics.median(firsts[k])} for k, setting in enumerate(settings)]


def second_epoch_start(dataset: Dataset, args: argparse.Namespace, consume: Callable,
                       workers: int) -> Dict[str, Any]:
    """Seconds to the first batch of epoch 2 without and with persistent_workers (alternating, medians)."""
    times: Dict[bool, List[float]] = {False: [], True: []}
    for rep in range(args.repeats):
        for persistent in ((False, True) if rep % 2 == 0 else (True, False)):
            loader = make_loader(dataset, args.batch_size, workers, workers, args.seed + rep, persistent=persistent)
            for batch in loader:  # epoch 1
                consume(batch)
            start = time.perf_counter()
            epoch2 = iter(loader)
            consume(next(epoch2))
            times[persistent].append(time.perf_counter() - start)
            del epoch2, loader  # shuts the workers down before the next measurement
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"workers": workers, "off_s": off, "on_s": on, "saved_s": off - on}


def workers_needed(rate: float, per_worker: float) -> int:
    """Loader workers for ``rate`` images/s when each worker delivers ``per_worker`` (linear scaling)."""
    return max(1, math.ceil(rate / per_worker))


def measure_wins(dataset: Dataset, args: argparse.Namespace, mixup: Any, device: torch.device) -> Dict[str, Any]:
    """The on/off rows at ``args.wins_workers`` workers."""
    w = args.wins_workers
    consume = make_consumer(mixup, device, non_blocking=False)
    wins: Dict[str, Any] = {"workers": w, "persistent_workers": second_epoch_start(dataset, args, consume, w)}
    rows = loader_rates(dataset, args, [{"workers": w, "consume": consume, "prefetch": f}
                                        for f in args.prefetch_factors])
    wins["prefetch_factor"] = [dict(row, prefetch_factor=f) for row, f in zip(rows, args.prefetch_factors)]
    if device.type == "cuda":
        pinned = make_consumer(mixup, device, non_blocking=True)
        off, on = loader_rates(dataset, args, [{"workers": w, "consume": consume, "pin": False},
                                               {"workers": w, "consume": pinned, "pin": True}])
        wins["pin_memory"] = {"off": off, "on": on}
    else:
        wins["pin_memory"] = None  # page-locked host memory only speeds up host-to-GPU copies
    wins["channels_last"] = None  # a model-step setting: nothing in the loader to measure
    return wins


def summarise(loader_rows: List[Dict[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    """Per-worker rate, the 2-worker linearity check and the workers each training rate needs."""
    by_workers = {row["workers"]: row["img_per_s"] for row in loader_rows}
    if 1 in by_workers:
        per_worker, source = by_workers[1], "1 worker"
    elif 0 in by_workers:  # the main process does one worker's job on one core
        per_worker, source = by_workers[0], "0 workers (this process)"
    else:
        w = min(by_workers)
        per_worker, source = by_workers[w] / w, f"{w} workers / {w}"
    scaling = by_workers[2] / (2 * by_workers[1]) if 1 in by_workers and 2 in by_workers else None
    per_worker_at_2 = by_workers[2] / 2 if 2 in by_workers else None
    needs = [{"label": label, "train_img_per_s": rate, "workers": workers_needed(rate, per_worker),
              "workers_at_2_worker_rate": workers_needed(rate, per_worker_at_2) if per_worker_at_2 else None}
             for label, rate in args.train_img_per_s]
    return {"per_worker_img_per_s": per_worker, "per_worker_from": source, "scaling_2_workers": scaling,
            "needs": needs, "cores": usable_cores()}


def compare_backends(dataset: Dataset, num_classes: int, mixup: Any, device: torch.device,
                     args: argparse.Namespace) -> Optional[List[Dict[str, Any]]]:
    """Section 5 (benchmarks/backends.py); None after an error line."""
    import backends

    if "dali" in args.backend:
        if args.fake_size is not None:
            print(f"{PROG}: error: --backend dali reads image files; use --data-path, not --fake-size", file=sys.stderr)
            return None
        try:
            import dali_loader

            dali_loader.require_dali()
        except ValueError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return None
    files = None
    if args.data_path:
        files, _ = datasets.build_dataset(True, datasets.DataSpec(name="FOLDER", path=args.data_path,
                                                                  skip_bad_images=False), None)
    rows = backends.backend_rates(args.backend, dataset, files, deit_augment(args.input_size, args.aa), args,
                                  make_consumer(mixup, device, non_blocking=False), run_epoch)
    backends.print_backend_rates(rows, args.input_size)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # as in a DataLoader worker: every loading process uses one core
    device = torch.device(args.device)
    try:
        dataset, num_classes, raw, transform = load_data(args)
        mixup = deit_mixup(num_classes)
    except ValueError as err:  # datasets.DataError and timm's checks
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    source = args.data_path or f"FAKE ({args.fake_size} images)"
    print(f"data {source}: {len(dataset)} images, {num_classes} classes; input {args.input_size} px, "
          f"batch {args.batch_size}, aa {args.aa}, device {device}")
    print(f"machine: {usable_cores()} usable cores ({cpu_model()}), torch {torch.__version__}")

    backends = None
    if args.backend:
        backends = compare_backends(dataset, num_classes, mixup, device, args)
        if backends is None:
            return 2
        if args.only_backends:
            if args.json:
                print(json.dumps({"data": source, "input_size": args.input_size, "backends": backends}))
            return 0
    breakdown = per_image_breakdown(raw, transform, len(dataset), args.per_image, args.repeats,
                                    "decode" if args.fake_size is None else "generate (FAKE image)")
    mixup_s = mixup_cost(mixup, args.batch_size, args.input_size, num_classes, device, args.repeats)
    data_report.print_breakdown(breakdown, mixup_s, args)

    consume = make_consumer(mixup, device, non_blocking=False)
    print(f"\nloader (shuffled, drop_last, mixup/CutMix in the loop; median of {args.repeats} interleaved runs, "
          f"{args.batches} timed batches each after the first round):", flush=True)
    loader_rows = loader_rates(dataset, args, [{"workers": w, "consume": consume} for w in args.workers])
    for row in loader_rows:
        w = row["workers"]
        print(f"  {w:>2} workers {row['img_per_s']:8.0f} img/s   first batch {row['first_batch_s'] * 1e3:6.0f} ms   "
              f"runs {' '.join(f'{r:.0f}' for r in row['img_per_s_runs'])}", flush=True)
    result = summarise(loader_rows, args)
    data_report.print_recommendation(result)

    wins = None if args.no_wins else measure_wins(dataset, args, mixup, device)
    if wins is not None:
        data_report.print_wins(wins)
    if args.json:
        print(json.dumps({"data": source, "images": len(dataset), "classes": num_classes,
                          "input_size": args.input_size, "batch_size": args.batch_size, "aa": args.aa,
                          "device": str(device), "cpu_model": cpu_model(), "torch": torch.__version__,
                          "per_image": breakdown, "mixup_s_per_batch": mixup_s, "loader": loader_rows,
                          **result, "wins": wins, "backends": backends}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
