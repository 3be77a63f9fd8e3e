"""bench_data.py's printed sections: the per-image breakdown, the worker recommendation and the cheap
loader settings (the numbers come from bench_data.py; this file only formats them)."""
from __future__ import annotations

import argparse
from typing import Any, Dict


def print_breakdown(breakdown: Dict[str, Any], mixup_s: float, args: argparse.Namespace) -> None:
    print(f"\nper image in this process (median of {args.repeats} passes over {breakdown['images']} images):")
    for name, ms in breakdown["steps_ms"].items():
        print(f"  {name:<36} {ms:8.3f} ms")
    print(f"  {'decode (or generate) only':<36} {breakdown['decode_img_per_s']:8.0f} img/s per core")
    print(f"  {'decode + full transform':<36} {breakdown['full_img_per_s']:8.0f} img/s per core")
    print(f"  mixup/CutMix of a batch on {args.device}: {mixup_s * 1e3:.2f} ms "
          f"({args.batch_size / mixup_s:.0f} img/s)")


def print_recommendation(result: Dict[str, Any]) -> None:
    per_worker, cores = result["per_worker_img_per_s"], result["cores"]
    print(f"\nper-worker rate {per_worker:.0f} img/s (from {result['per_worker_from']}); assumption: the loader "
          f"scales linearly with workers up to the {cores} usable cores (one of them also runs the training loop)")
    scaling = result["scaling_2_workers"]
    if scaling is not None:
        verdict = "holds" if scaling >= 0.85 else \
            "does NOT hold here (shared or busy cores?): the counts below are lower bounds"
        print(f"check: 2 workers deliver {scaling:.2f} x twice the 1-worker rate: linear scaling {verdict}")
    for need in result["needs"]:
        note = "" if need["workers"] < cores else f"  (this machine has {cores} cores, one runs the training loop)"
        print(f"{need['label']} at {need['train_img_per_s']:g} img/s needs >= {need['workers']} workers{note}")
        if need["workers_at_2_worker_rate"] is not None and need["workers_at_2_worker_rate"] != need["workers"]:
            print(f"  (>= {need['workers_at_2_worker_rate']} at the per-worker rate measured with 2 workers)")
    if not result["needs"]:
        print("pass --train-img-per-s [LABEL=]IMG_PER_S (train_img_per_s of log.txt, per GPU) for a worker count")


def print_wins(wins: Dict[str, Any]) -> None:
    w = wins["workers"]
    pw = wins["persistent_workers"]
    print(f"\ncheap settings at {w} workers (on/off):")
    print(f"  persistent_workers  first batch of epoch 2: off {pw['off_s'] * 1e3:.0f} ms, on {pw['on_s'] * 1e3:.0f} ms "
          f"(saves {pw['saved_s'] * 1e3:.0f} ms per epoch start)")
    for row in wins["prefetch_factor"]:
        print(f"  prefetch_factor {row['prefetch_factor']:<3} {row['img_per_s']:8.0f} img/s")
    pin = wins["pin_memory"]
    if pin is None:
        print("  pin_memory + non_blocking: n/a (no CUDA device: pinning only speeds up host-to-GPU copies)")
    else:
        print(f"  pin_memory + non_blocking: off {pin['off']['img_per_s']:.0f} img/s, "
              f"on {pin['on']['img_per_s']:.0f} img/s")
    print("  channels_last: not measured (a model-step setting; see benchmarks/README.md)")
