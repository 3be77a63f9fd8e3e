"""bench_data.py --backend pil dali: the full DeiT training input pipeline of each backend, side by side.

For each backend, steady images/s of: read + decode + random resized crop + flip + RandAugment + normalise +
random erasing, then the batch copied to the device and mixed (mixup/CutMix), as in training:
- pil: a DataLoader with ONE worker process (one core);
- dali: DaliTrainLoader with ONE DALI thread in CPU-only mode (one core);
  with CUDA also the GPU pipeline (nvJPEG "mixed" decode, ops on the GPU) with ``--dali-threads`` threads:
  the loader rate per GPU.
Each rate is a median over ``repeats`` runs of ``batches`` timed batches after the first (pipeline build,
worker start-up). The runs of the backends alternate, so drifting load from other jobs hits both.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List

import torch
from torch.utils.data import DataLoader, RandomSampler


def _pil_loader(dataset: Any, batch_size: int, batches: int, seed: int) -> DataLoader:
    sampler = RandomSampler(dataset, num_samples=batches * batch_size, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=1, drop_last=True)


def _dali_loader(files: Any, aug: Any, batch_size: int, batches: int, seed: int, threads: int,
                 device: torch.device):
    from dali_loader.loader import DaliTrainLoader

    sampler = RandomSampler(files, num_samples=batches * batch_size, generator=torch.Generator().manual_seed(seed))
    return DaliTrainLoader(files, sampler, aug, batch_size, threads, device, torch.Generator().manual_seed(seed))


def backend_rates(backends: List[str], pil_set: Any, files: Any, aug: Any, args: Any, consume: Callable,
                  run_epoch: Callable) -> List[Dict[str, Any]]:
    """Rows {'backend', 'where', 'cores', 'img_per_s', 'img_per_s_per_core', 'runs'}; ``files`` is the same
    folder without a transform (what DALI reads)."""
    settings = []
    for backend in backends:
        if backend == "pil":
            settings.append(("pil", "cpu, 1 DataLoader worker", 1,
                             lambda rep: _pil_loader(pil_set, args.batch_size, args.batches + 1, args.seed + rep)))
        else:
            settings.append(("dali", "cpu-only, 1 DALI thread", 1,
                             lambda rep: _dali_loader(files, aug, args.batch_size, args.batches + 1, args.seed + rep,
                                                      1, torch.device("cpu"))))
            if torch.cuda.is_available():
                gpu = torch.device("cuda", 0)
                settings.append(("dali", f"GPU (mixed decode), {args.dali_threads} DALI threads", None,
                                 lambda rep: _dali_loader(files, aug, args.batch_size, args.batches + 1,
                                                          args.seed + rep, args.dali_threads, gpu)))
    runs: List[List[float]] = [[] for _ in settings]
    for rep in range(args.repeats):
        for k in range(len(settings)):
            k = (k + rep) % len(settings)
            _, rate = run_epoch(settings[k][3](rep), consume, 1)
            runs[k].append(rate)
    rows = []
    for (backend, where, cores, _), rates in zip(settings, runs):
        rate = statistics.median(rates)
        rows.append({"backend": backend, "where": where, "cores": cores, "img_per_s": rate,
                     "img_per_s_per_core": rate / cores if cores else None, "runs": rates})
    return rows


def print_backend_rates(rows: List[Dict[str, Any]], size: int) -> None:
    print(f"\nfull training pipeline at {size} px by backend (median img/s; + copy to the device and mixup/CutMix):")
    for row in rows:
        per_core = f"{row['img_per_s_per_core']:8.0f} img/s per core" if row["cores"] else "  (per GPU)"
        print(f"  {row['backend']:<5} {row['where']:<40} {row['img_per_s']:8.0f} img/s {per_core}   "
              f"runs {' '.join(f'{r:.0f}' for r in row['runs'])}", flush=True)
