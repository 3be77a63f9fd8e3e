"""The numbers printed in the ToE paper (Huang et al., CVPR 2024), as plain data: the one place that holds
them. ``toe.flops --paper-tables`` and ``report/paper_results.py`` (hence ``scripts/summarize.py``) read them
from here.

``TABLES[table][group][row]`` is a dict ``{column: value}``; ``None`` means the paper prints nothing there
(or, for Table 6's r0/r1 = 1/3 cell, that it is empty in our copy of the paper). Groups are the paper's model
names (keys of :data:`MODELS`); rows are the method / setting labels. Columns:

* ``top1``: Top-1 accuracy (%) on ImageNet-1K (Tables 2, 3, 4, 6-9); ``std``: Table 7's "± std" of 3 runs.
* ``gflops``: GFLOPs per training iteration (thop forward MACs x 3 x batch: batch 1024 in Tables 2, 3, 8;
  batch 4096 in Table 4). ``gflops_speedup``: the "(1.27x)" after it (None on baseline rows).
* ``gpu_hours``: total training GPU hours (RTX A6000: 4 GPUs for Tables 2, 3, 6-9, 8 GPUs for Table 4).
  ``acceleration``: the "(1.24x)" after it; 1.00 on baseline rows (the reference). Table 6's 44.0 is its
  caption's "about 44h" for every column.
* Table 5 (fine-tuning on CIFAR): ``cifar10``, ``cifar100`` top-1 (%) and the "1.3x" marks of
  ``pretrain_acceleration`` / ``finetune_acceleration`` (1.0 without ToE). Its rows are
  ``"pre <Baseline|ToE r1=0.5> / ft <Baseline|ToE r1=0.5>"``. The paper's DeiT-small row 2 prints "1.3x" as
  the pre-training acceleration of a Baseline pre-training, a typo kept out of this data (1.0 here).
"""
from __future__ import annotations

from typing import Dict, List, Optional

__all__ = ["MODELS", "TABLES", "value", "row", "groups", "rows"]

# The paper's model names -> timm names (LV-ViT: registered by the training repository's `models`).
MODELS: Dict[str, str] = {
    "DeiT-tiny": "deit_tiny_patch16_224", "DeiT-small": "deit_small_patch16_224",
    "DeiT-base": "deit_base_patch16_224",
    "LV-ViT-T": "lvvit_t", "LV-ViT-S": "lvvit_s", "LV-ViT-M": "lvvit_m",
}


def _main(top1: float, gflops: float, gflops_speedup: Optional[float], gpu_hours: float,
          acceleration: float) -> Dict[str, Optional[float]]:
    return {"top1": top1, "gflops": gflops, "gflops_speedup": gflops_speedup, "gpu_hours": gpu_hours,
            "acceleration": acceleration}


def _cifar(c10: float, c100: float, pre: float, ft: float) -> Dict[str, Optional[float]]:
    return {"cifar10": c10, "cifar100": c100, "pretrain_acceleration": pre, "finetune_acceleration": ft}


_PRE_FT = "pre {} / ft {}"
_B, _T = "Baseline", "ToE r1=0.5"

TABLES: Dict[str, Dict[str, Dict[str, Dict[str, Optional[float]]]]] = {
    # Table 2. DeiT on ImageNet-1K: Top-1, GFLOPs per training iteration (batch 1024), GPU hours.
    "2": {
        "DeiT-tiny": {"Baseline": _main(72.2, 3.3e3, None, 54.6, 1.00),
                      "ToE r1=0.5": _main(72.6, 2.6e3, 1.27, 44.2, 1.24)},
        "DeiT-small": {"Baseline": _main(79.8, 1.3e4, None, 124.5, 1.00),
                       "ToE r1=0.5": _main(79.8, 1.0e4, 1.30, 102.2, 1.22)},
        "DeiT-base": {"Baseline": _main(81.8, 5.2e4, None, 292.8, 1.00),
                      "ToE r1=0.5": _main(81.6, 4.0e4, 1.30, 231.2, 1.27),
                      "ToE r1=0.4": _main(81.4, 3.8e4, 1.37, 225.2, 1.30)},
    },
    # Table 3. LV-ViT on ImageNet-1K (token labeling, EMA top-1), same columns.
    "3": {
        "LV-ViT-T": {"Baseline": _main(79.1, 8.2e3, None, 130.5, 1.00),
                     "ToE r1=0.4": _main(79.4, 7.0e3, 1.17, 113.9, 1.15)},
        "LV-ViT-S": {"Baseline": _main(83.3, 1.9e4, None, 237.3, 1.00),
                     "ToE r1=0.4": _main(83.3, 1.4e4, 1.36, 195.3, 1.22)},
        "LV-ViT-M": {"Baseline": _main(84.1, 3.7e4, None, 368.7, 1.00),
                     "ToE r1=0.4": _main(84.1, 2.7e4, 1.37, 292.5, 1.26)},
    },
    # Table 4. EfficientTrain and EfficientTrain + ToE (r1 = 0.6) on ImageNet-1K: GFLOPs at batch 4096.
    "4": {
        "DeiT-tiny": {"Baseline": _main(72.5, 1.3e4, None, 52.5, 1.00),
                      "EfficientTrain": _main(73.3, 8.8e3, 1.48, 36.5, 1.44),
                      "EfficientTrain + ToE r1=0.6": _main(73.5, 7.6e3, 1.71, 32.3, 1.63)},
        "DeiT-small": {"Baseline": _main(80.3, 5.2e4, None, 121.3, 1.00),
                       "EfficientTrain": _main(80.4, 3.4e4, 1.53, 85.2, 1.42),
                       "EfficientTrain + ToE r1=0.6": _main(80.4, 2.9e4, 1.79, 79.4, 1.53)},
    },
    # Table 5. Fine-tuning on CIFAR-10/100 from a Baseline or ToE pre-training, with or without ToE.
    "5": {
        "DeiT-tiny": {_PRE_FT.format(_B, _B): _cifar(98.07, 86.78, 1.0, 1.0),
                      _PRE_FT.format(_B, _T): _cifar(98.10, 86.74, 1.0, 1.3),
                      _PRE_FT.format(_T, _B): _cifar(98.19, 87.10, 1.3, 1.0),
                      _PRE_FT.format(_T, _T): _cifar(98.16, 86.91, 1.3, 1.3)},
        "DeiT-small": {_PRE_FT.format(_B, _B): _cifar(98.93, 90.15, 1.0, 1.0),
                       _PRE_FT.format(_B, _T): _cifar(98.96, 90.19, 1.0, 1.3),
                       _PRE_FT.format(_T, _B): _cifar(99.03, 90.37, 1.3, 1.0),
                       _PRE_FT.format(_T, _T): _cifar(98.99, 90.26, 1.3, 1.3)},
    },
    # Table 6. DeiT-tiny speedup factors (default r0/r1 = 1/2, Ng = 3, k = 2): Top-1, GPU hours.
    "6": {
        "DeiT-tiny": {"r0/r1 = 1/3": {"top1": None, "gpu_hours": 44.0},
                      "r0/r1 = 2/3": {"top1": 72.3, "gpu_hours": 44.0},
                      "Ng = 2": {"top1": 72.5, "gpu_hours": 44.0},
                      "Ng = 4": {"top1": 72.4, "gpu_hours": 44.0},
                      "k = 1": {"top1": 72.5, "gpu_hours": 44.0},
                      "k = 3": {"top1": 72.5, "gpu_hours": 44.0},
                      "default (1/2, 3, 2)": {"top1": 72.6, "gpu_hours": 44.2}},
    },
    # Table 7. The initialization-expansion-merge pipeline: Top-1 (± std over 3 runs for random init).
    "7": {
        "DeiT-tiny": {"Spatial init + expansion + merge": {"top1": 72.6, "std": None},
                      "Random init, no expansion, merge": {"top1": 72.3, "std": 0.2},
                      "Spatial init, no expansion, merge": {"top1": 71.2, "std": None},
                      "Spatial init + expansion, no merge": {"top1": 71.7, "std": None}},
        "DeiT-small": {"Spatial init + expansion + merge": {"top1": 79.8, "std": None},
                       "Random init, no expansion, merge": {"top1": 79.7, "std": 0.1},
                       "Spatial init, no expansion, merge": {"top1": 79.1, "std": None},
                       "Spatial init + expansion, no merge": {"top1": 79.6, "std": None}},
    },
    # Table 8. Where to apply ToE (DeiT-tiny, r1 = 0.5): Top-1, GFLOPs (batch 1024, 3 digits), GPU hours.
    "8": {
        "DeiT-tiny": {"Embedding (layer 0)": {"top1": 72.1, "gflops": 2.51e3, "gpu_hours": 43.5},
                      "First block (layer 1)": {"top1": 72.6, "gflops": 2.58e3, "gpu_hours": 44.2},
                      "Second block (layer 2)": {"top1": 72.2, "gflops": 2.65e3, "gpu_hours": 45.2},
                      "Third block (layer 3)": {"top1": 72.1, "gflops": 2.71e3, "gpu_hours": 46.9}},
    },
    # Table 9. Feature-distribution distance: Top-1.
    "9": {
        "DeiT-tiny": {"Manhattan distance": {"top1": 69.8}, "Euclidean distance": {"top1": 70.6},
                      "Cosine distance": {"top1": 72.6}},
        "DeiT-small": {"Manhattan distance": {"top1": 78.0}, "Euclidean distance": {"top1": 78.4},
                       "Cosine distance": {"top1": 79.8}},
    },
}


def row(table: str, group: str, label: str) -> Dict[str, Optional[float]]:
    """A copy of the printed columns of row ``label`` of ``group`` (a model) in ``table`` (e.g. "2").
    Raises KeyError naming what is missing."""
    if table not in TABLES:
        raise KeyError(f"no paper table {table!r} (known: {', '.join(TABLES)})")
    if group not in TABLES[table]:
        raise KeyError(f"table {table} has no group {group!r} (known: {', '.join(TABLES[table])})")
    if label not in TABLES[table][group]:
        raise KeyError(f"table {table} group {group} has no row {label!r}")
    return dict(TABLES[table][group][label])


def value(table: str, group: str, label: str, column: str) -> Optional[float]:
    """The printed ``column`` (see the module docstring) of row ``label`` of ``group`` in ``table``;
    e.g. ``value("2", "DeiT-tiny", "ToE r1=0.5", "gflops") == 2.6e3``."""
    printed = row(table, group, label)
    if column not in printed:
        raise KeyError(f"table {table} {group} {label!r} has no column {column!r} (has: {', '.join(printed)})")
    return printed[column]


def groups(table: str) -> List[str]:
    """The groups (models) of ``table``, in the paper's order."""
    return list(TABLES[table])


def rows(table: str, group: str) -> List[str]:
    """The row labels of ``group`` in ``table``, in the paper's order."""
    return list(TABLES[table][group])
