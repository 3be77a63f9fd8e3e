"""The ToE paper's printed numbers (Huang et al., CVPR 2024), as data: the one source for summarize.py and
README.md ("Reproducing the paper").

Each table lists rows. A row says which runs it holds (``match``: a subset of the run configuration that
summarize.py derives from a run's args, see ``summarize.run_config``) and the numbers the paper prints for
it. ``None`` means the paper prints nothing there (or, for Table 6's r0/r1 = 1/3 cell, that the value is
missing from our copy of the paper: the cell is empty in /work/shared/reference/toe-paper.txt).

Units: top-1 in %, GFLOPs per training iteration (thop forward x 3 x batch 1024), total GPU hours (RTX A6000;
DeiT-tiny/small/base timed on 1/2/4 GPUs, LV-ViT-T/S on 2/4), accelerations as printed ("1.27x" -> 1.27).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

DEIT = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224", "base": "deit_base_patch16_224"}
LVVIT = {"T": "lvvit_t", "S": "lvvit_s", "M": "lvvit_m"}

# The paper's default ToE setting (Sec. 4.1): r0 = r1 / 2, ng = 3, k = 2, ToE on the output of block 1,
# cosine distance, spatial initialisation, expansion and merging on.
TOE_DEFAULTS: Dict[str, Any] = {"r0_ratio": 0.5, "ng": 3, "k": 2, "layer": 1, "distance": "cosine",
                                "init": "spatial", "expand": True, "merge": True}


def baseline(model: str, **extra: Any) -> Dict[str, Any]:
    """Match spec of a full-token (no ToE) run of ``model``."""
    return {"model": model, "toe": False, **extra}


def toe(model: str, r1: float, **over: Any) -> Dict[str, Any]:
    """Match spec of a ToE run of ``model`` with keep rate ``r1`` and the paper's defaults unless overridden.
    Keys of ``over`` that are not ToE settings (dataset, finetune_from, token_label) are matched too."""
    return {"model": model, "toe": True, "r1": r1, **TOE_DEFAULTS, **over}


def _row(label: str, match: Dict[str, Any], **paper: Any) -> Dict[str, Any]:
    return {"label": label, "match": match, "paper": paper}


def _imagenet_rows(model: str, group: str, rows: List[tuple], token_label: bool) -> List[Dict[str, Any]]:
    """Tables 2/3: (label, r1 or None for the baseline, top-1, GFLOPs, GFLOPs speedup, GPU hours,
    acceleration) rows of one ImageNet model -> row dicts."""
    out = []
    for label, r1, top1, gflops, gflops_x, hours, accel in rows:
        match = (baseline(model, dataset="imagenet", token_label=token_label) if r1 is None
                 else toe(model, r1, dataset="imagenet", token_label=token_label))
        out.append(dict(_row(label, match, top1=top1, gflops=gflops, gflops_speedup=gflops_x, gpu_hours=hours,
                             acceleration=accel), group=group))
    return out


# ------------------------------------------------------------------------------------------------ Table 2
_T2: List[Dict[str, Any]] = []
for _size, _rows in {
    "tiny": [("Baseline", None, 72.2, 3.3e3, None, 54.6, 1.00),
             ("ToE r1=0.5", 0.5, 72.6, 2.6e3, 1.27, 44.2, 1.24)],
    "small": [("Baseline", None, 79.8, 1.3e4, None, 124.5, 1.00),
              ("ToE r1=0.5", 0.5, 79.8, 1.0e4, 1.30, 102.2, 1.22)],
    "base": [("Baseline", None, 81.8, 5.2e4, None, 292.8, 1.00),
             ("ToE r1=0.5", 0.5, 81.6, 4.0e4, 1.30, 231.2, 1.27),
             ("ToE r1=0.4", 0.4, 81.4, 3.8e4, 1.37, 225.2, 1.30)],
}.items():
    _T2 += _imagenet_rows(DEIT[_size], f"DeiT-{_size}", _rows, token_label=False)

# ------------------------------------------------------------------------------------------------ Table 3
_T3: List[Dict[str, Any]] = []
for _size, _rows in {
    "T": [("Baseline", None, 79.1, 8.2e3, None, 130.5, 1.00),
          ("ToE r1=0.4", 0.4, 79.4, 7.0e3, 1.17, 113.9, 1.15)],
    "S": [("Baseline", None, 83.3, 1.9e4, None, 237.3, 1.00),
          ("ToE r1=0.4", 0.4, 83.3, 1.4e4, 1.36, 195.3, 1.22)],
    "M": [("Baseline", None, 84.1, 3.7e4, None, 368.7, 1.00),
          ("ToE r1=0.4", 0.4, 84.1, 2.7e4, 1.37, 292.5, 1.26)],
}.items():
    _T3 += _imagenet_rows(LVVIT[_size], f"LV-ViT-{_size}", _rows, token_label=True)

# ------------------------------------------------------------------------------------------------ Table 5
# (pre-training, fine-tuning) -> (CIFAR-10, CIFAR-100) top-1. The paper's DeiT-small row 2 prints "1.3x" as
# the pre-training acceleration of a Baseline pre-training (a typo: it is the same baseline as row 1).
_T5_PAPER = {
    "tiny": {("baseline", "baseline"): (98.07, 86.78), ("baseline", "toe"): (98.10, 86.74),
             ("toe", "baseline"): (98.19, 87.10), ("toe", "toe"): (98.16, 86.91)},
    "small": {("baseline", "baseline"): (98.93, 90.15), ("baseline", "toe"): (98.96, 90.19),
              ("toe", "baseline"): (99.03, 90.37), ("toe", "toe"): (98.99, 90.26)},
}
_T5: List[Dict[str, Any]] = []
for _size, _cells in _T5_PAPER.items():
    for (_pre, _ft), (_c10, _c100) in _cells.items():
        _label = f"pre {'ToE r1=0.5' if _pre == 'toe' else 'Baseline'} / ft {'ToE r1=0.5' if _ft == 'toe' else 'Baseline'}"
        _cols = {}
        for _ds, _val in (("cifar10", _c10), ("cifar100", _c100)):
            _m = (toe(DEIT[_size], 0.5, dataset=_ds, finetune_from=_pre) if _ft == "toe"
                  else baseline(DEIT[_size], dataset=_ds, finetune_from=_pre))
            _cols[_ds] = {"match": _m, "top1": _val}
        _T5.append({"label": _label, "group": f"DeiT-{_size}", "pretrain": _pre, "finetune": _ft,
                    "columns": _cols, "paper": {"pretrain_acceleration": 1.3 if _pre == "toe" else 1.0,
                                                "finetune_acceleration": 1.3 if _ft == "toe" else 1.0}})

# ------------------------------------------------------------------------------------------------ Table 6
_tiny = DEIT["tiny"]
_T6 = [
    _row("r0/r1 = 1/3", toe(_tiny, 0.5, r0_ratio=1 / 3, dataset="imagenet"), top1=None, gpu_hours=44.0),
    _row("r0/r1 = 2/3", toe(_tiny, 0.5, r0_ratio=2 / 3, dataset="imagenet"), top1=72.3, gpu_hours=44.0),
    _row("Ng = 2", toe(_tiny, 0.5, ng=2, dataset="imagenet"), top1=72.5, gpu_hours=44.0),
    _row("Ng = 4", toe(_tiny, 0.5, ng=4, dataset="imagenet"), top1=72.4, gpu_hours=44.0),
    _row("k = 1", toe(_tiny, 0.5, k=1, dataset="imagenet"), top1=72.5, gpu_hours=44.0),
    _row("k = 3", toe(_tiny, 0.5, k=3, dataset="imagenet"), top1=72.5, gpu_hours=44.0),
    _row("default (1/2, 3, 2)", toe(_tiny, 0.5, dataset="imagenet"), top1=72.6, gpu_hours=44.2),
]

# ------------------------------------------------------------------------------------------------ Table 7
_T7_SPEC = [  # label, overrides, tiny top1, small top1 (the 2nd row is the mean +- std of 3 runs)
    ("Spatial init + expansion + merge", {}, 72.6, 79.8),
    ("Random init, no expansion, merge", {"init": "random", "expand": False}, 72.3, 79.7),
    ("Spatial init, no expansion, merge", {"expand": False}, 71.2, 79.1),
    ("Spatial init + expansion, no merge", {"merge": False}, 71.7, 79.6),
]
_T7_STD = {"Random init, no expansion, merge": (0.2, 0.1)}
_T7 = []
for _label, _over, _t, _s in _T7_SPEC:
    _T7.append({"label": _label, "columns": {
        "DeiT-tiny": {"match": toe(DEIT["tiny"], 0.5, dataset="imagenet", **_over), "top1": _t,
                      "std": _T7_STD.get(_label, (None, None))[0]},
        "DeiT-small": {"match": toe(DEIT["small"], 0.5, dataset="imagenet", **_over), "top1": _s,
                       "std": _T7_STD.get(_label, (None, None))[1]}}})

# ------------------------------------------------------------------------------------------------ Table 8
_T8 = [
    _row("Embedding (layer 0)", toe(_tiny, 0.5, layer=0, dataset="imagenet"), top1=72.1, gflops=2.51e3, gpu_hours=43.5),
    _row("First block (layer 1)", toe(_tiny, 0.5, layer=1, dataset="imagenet"), top1=72.6, gflops=2.58e3, gpu_hours=44.2),
    _row("Second block (layer 2)", toe(_tiny, 0.5, layer=2, dataset="imagenet"), top1=72.2, gflops=2.65e3, gpu_hours=45.2),
    _row("Third block (layer 3)", toe(_tiny, 0.5, layer=3, dataset="imagenet"), top1=72.1, gflops=2.71e3, gpu_hours=46.9),
]

# ------------------------------------------------------------------------------------------------ Table 9
_T9 = []
for _label, _dist, _t, _s in (("Manhattan distance", "manhattan", 69.8, 78.0),
                              ("Euclidean distance", "euclidean", 70.6, 78.4),
                              ("Cosine distance", "cosine", 72.6, 79.8)):
    _T9.append({"label": _label, "columns": {
        "DeiT-tiny": {"match": toe(DEIT["tiny"], 0.5, distance=_dist, dataset="imagenet"), "top1": _t},
        "DeiT-small": {"match": toe(DEIT["small"], 0.5, distance=_dist, dataset="imagenet"), "top1": _s}}})


TABLES: Dict[str, Dict[str, Any]] = {
    "2": {"title": "Table 2. DeiT on ImageNet-1K", "script": "scripts/table2_deit.sh", "layout": "main",
          "metric": "test_acc1", "rows": _T2},
    "3": {"title": "Table 3. LV-ViT on ImageNet-1K (token labeling, EMA)", "script": "scripts/table3_lvvit.sh",
          "layout": "main", "metric": "ema_test_acc1", "rows": _T3},
    "5": {"title": "Table 5. Fine-tuning DeiT on CIFAR-10/100", "script": "scripts/table5_cifar.sh",
          "layout": "cifar", "metric": "test_acc1", "rows": _T5},
    "6": {"title": "Table 6. DeiT-tiny speedup factors (default r0/r1=1/2, Ng=3, k=2)",
          "script": "scripts/table6_hparams.sh", "layout": "list", "metric": "test_acc1", "rows": _T6,
          "note": "the paper's r0/r1 = 1/3 cell is empty in our copy of the paper; its caption says every "
                  "column trains in about 44 GPU hours"},
    "7": {"title": "Table 7. The initialization-expansion-merge pipeline", "script": "scripts/table7_ablation.sh",
          "layout": "columns", "metric": "test_acc1", "rows": _T7,
          "note": "the paper's random-init row is the mean +- std of 3 runs (seeds 0, 1, 2 here)"},
    "8": {"title": "Table 8. Where to apply ToE (DeiT-tiny, r1=0.5)", "script": "scripts/table8_layer.sh",
          "layout": "list", "metric": "test_acc1", "rows": _T8},
    "9": {"title": "Table 9. Feature-distribution distance", "script": "scripts/table9_distance.sh",
          "layout": "columns", "metric": "test_acc1", "rows": _T9},
}

# Total GPU hours the paper prints for the runs of each script (RTX A6000). Tables 5, 7 and 9 print no
# times; their estimate counts each run at the time of its model's default ToE run (Table 2), and Table 5's
# fine-tuning has no printed time at all.
PAPER_GPU_HOURS: Dict[str, Optional[float]] = {
    "2": 54.6 + 44.2 + 124.5 + 102.2 + 292.8 + 231.2 + 225.2,
    "3": 130.5 + 113.9 + 237.3 + 195.3 + 368.7 + 292.5,
    "5": None,
    "6": 44.0 * 6,
    "7": None,
    "8": 43.5 + 45.2 + 46.9,
    "9": None,
}
ESTIMATED_GPU_HOURS: Dict[str, float] = {
    "6": 44.0 * 6,                  # six new runs, "about 44h" each per the caption (default shared with Table 2)
    "7": 5 * 44.2 + 5 * 102.2,      # five new runs per model (3 seeds of random init + 2 ablations)
    "9": 2 * 44.2 + 2 * 102.2,      # two new distances per model
}


def paper_value(table: str, label: str, key: str = "top1", column: Optional[str] = None) -> Any:
    """The paper's printed ``key`` of the row ``label`` of ``table`` (column ``column`` for column layouts)."""
    for row in TABLES[table]["rows"]:
        if row["label"] == label:
            if column is not None:
                return row["columns"][column][key]
            return row["paper"][key]
    raise KeyError(f"table {table} has no row {label!r}")
