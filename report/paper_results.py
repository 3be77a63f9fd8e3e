"""The ToE paper's tables (Huang et al., CVPR 2024) as summarize.py needs them: which runs each row holds,
next to the numbers the paper prints. The one source for summarize.py and docs/reproducing.md.

The printed numbers themselves live in ``toe/paper.py`` (``toe.paper.TABLES``, shared with
``python -m toe.flops --paper-tables``); this module only arranges them. Each table lists rows. A row says
which runs it holds (``match``: a subset of the run configuration that summarize.py derives from a run's
args, see ``report.runargs.run_config``) and the numbers the paper prints for it. ``None`` means the paper prints
nothing there (or, for Table 6's r0/r1 = 1/3 cell, that the value is missing from our copy of the paper: the
cell is empty in /work/shared/reference/toe-paper.txt).

Units: top-1 in %, GFLOPs per training iteration (thop forward x 3 x batch: 1024, or 4096 in Table 4), total
GPU hours (RTX A6000; DeiT-tiny/small/base timed on 1/2/4 GPUs, LV-ViT-T/S on 2/4, Table 4 on 8),
accelerations as printed ("1.27x" -> 1.27).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import toe.paper as printed  # (binds `printed` only: `toe` below is this module's match builder)

DEIT = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224", "base": "deit_base_patch16_224"}
LVVIT = {"T": "lvvit_t", "S": "lvvit_s", "M": "lvvit_m"}

# The paper's default ToE setting (Sec. 4.1): r0 = r1 / 2, ng = 3, k = 2, ToE on the output of block 1,
# cosine distance, spatial initialisation, expansion and merging on.
TOE_DEFAULTS: Dict[str, Any] = {"r0_ratio": 0.5, "ng": 3, "k": 2, "layer": 1, "distance": "cosine",
                                "init": "spatial", "expand": True, "merge": True}

# Table 4's recipe (EfficientTrain's DeiT setting): global batch 4096, with or without its curriculum.
EFFICIENTTRAIN_BATCH = 4096


def baseline(model: str, **extra: Any) -> Dict[str, Any]:
    """Match spec of a full-token (no ToE) run of ``model``."""
    return {"model": model, "toe": False, **extra}


def toe(model: str, r1: float, **over: Any) -> Dict[str, Any]:
    """Match spec of a ToE run of ``model`` with keep rate ``r1`` and the paper's defaults unless overridden.
    Keys of ``over`` that are not ToE settings (dataset, finetune_from, token_label) are matched too."""
    return {"model": model, "toe": True, "r1": r1, **TOE_DEFAULTS, **over}


def _row(label: str, match: Dict[str, Any], **paper: Any) -> Dict[str, Any]:
    return {"label": label, "match": match, "paper": paper}


def _printed_row(table: str, group: str, label: str, match: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """A row of ``table`` whose paper numbers are toe.paper's row ``label`` of ``group``."""
    return _row(label, match, **printed.row(table, group, label), **extra)


def _imagenet_rows(model: str, group: str, rows: List[tuple], token_label: bool) -> List[Dict[str, Any]]:
    """Tables 2/3: (label, r1 or None for the baseline) rows of one ImageNet model -> row dicts with the
    printed top-1, GFLOPs, GFLOPs speedup, GPU hours and acceleration."""
    table = "3" if token_label else "2"
    out = []
    for label, r1 in rows:
        match = (baseline(model, dataset="imagenet", token_label=token_label) if r1 is None
                 else toe(model, r1, dataset="imagenet", token_label=token_label))
        out.append(dict(_printed_row(table, group, label, match), group=group))
    return out


# ------------------------------------------------------------------------------------------------ Table 2
_T2: List[Dict[str, Any]] = []
for _size, _rows in {
    "tiny": [("Baseline", None), ("ToE r1=0.5", 0.5)],
    "small": [("Baseline", None), ("ToE r1=0.5", 0.5)],
    "base": [("Baseline", None), ("ToE r1=0.5", 0.5), ("ToE r1=0.4", 0.4)],
}.items():
    _T2 += _imagenet_rows(DEIT[_size], f"DeiT-{_size}", _rows, token_label=False)

# ------------------------------------------------------------------------------------------------ Table 3
_T3: List[Dict[str, Any]] = []
for _size in ("T", "S", "M"):
    _T3 += _imagenet_rows(LVVIT[_size], f"LV-ViT-{_size}", [("Baseline", None), ("ToE r1=0.4", 0.4)],
                          token_label=True)

# ------------------------------------------------------------------------------------------------ Table 4
# EfficientTrain's recipe at global batch 4096; the baseline trains it without the curriculum. ToE r1 = 0.6
# with r0 = 0.3 (= r1 / 2, the default ratio), Ng = 3, k = 2, stages at epochs 0/100/200, after block 1.
_T4: List[Dict[str, Any]] = []
for _size in ("tiny", "small"):
    _common = {"dataset": "imagenet", "token_label": False, "global_batch": EFFICIENTTRAIN_BATCH}
    for _label, _match in (
            ("Baseline", baseline(DEIT[_size], curriculum=None, **_common)),
            ("EfficientTrain", baseline(DEIT[_size], curriculum="efficienttrain", **_common)),
            ("EfficientTrain + ToE r1=0.6", toe(DEIT[_size], 0.6, curriculum="efficienttrain", **_common))):
        _T4.append(dict(_printed_row("4", f"DeiT-{_size}", _label, _match), group=f"DeiT-{_size}"))

# ------------------------------------------------------------------------------------------------ Table 5
# (pre-training, fine-tuning) cells of the CIFAR-10 / CIFAR-100 top-1.
_T5: List[Dict[str, Any]] = []
for _size in ("tiny", "small"):
    for _pre, _ft in (("baseline", "baseline"), ("baseline", "toe"), ("toe", "baseline"), ("toe", "toe")):
        _label = "pre {} / ft {}".format(*("ToE r1=0.5" if _x == "toe" else "Baseline" for _x in (_pre, _ft)))
        _p = printed.row("5", f"DeiT-{_size}", _label)
        _cols = {}
        for _ds in ("cifar10", "cifar100"):
            _m = (toe(DEIT[_size], 0.5, dataset=_ds, finetune_from=_pre) if _ft == "toe"
                  else baseline(DEIT[_size], dataset=_ds, finetune_from=_pre))
            _cols[_ds] = {"match": _m, "top1": _p[_ds]}
        _T5.append({"label": _label, "group": f"DeiT-{_size}", "pretrain": _pre, "finetune": _ft,
                    "columns": _cols, "paper": {"pretrain_acceleration": _p["pretrain_acceleration"],
                                                "finetune_acceleration": _p["finetune_acceleration"]}})

# ------------------------------------------------------------------------------------------------ Table 6
_tiny = DEIT["tiny"]
_T6 = [_printed_row("6", "DeiT-tiny", _label, toe(_tiny, 0.5, dataset="imagenet", **_over)) for _label, _over in (
    ("r0/r1 = 1/3", {"r0_ratio": 1 / 3}), ("r0/r1 = 2/3", {"r0_ratio": 2 / 3}), ("Ng = 2", {"ng": 2}),
    ("Ng = 4", {"ng": 4}), ("k = 1", {"k": 1}), ("k = 3", {"k": 3}), ("default (1/2, 3, 2)", {}))]

# ------------------------------------------------------------------------------------------------ Table 7
_T7_SPEC = [  # label, overrides (the 2nd row's paper numbers are the mean +- std of 3 runs)
    ("Spatial init + expansion + merge", {}),
    ("Random init, no expansion, merge", {"init": "random", "expand": False}),
    ("Spatial init, no expansion, merge", {"expand": False}),
    ("Spatial init + expansion, no merge", {"merge": False}),
]
_T7 = []
for _label, _over in _T7_SPEC:
    _T7.append({"label": _label, "columns": {
        _group: {"match": toe(DEIT[_size], 0.5, dataset="imagenet", **_over),
                 "top1": printed.value("7", _group, _label, "top1"), "std": printed.value("7", _group, _label, "std")}
        for _size, _group in (("tiny", "DeiT-tiny"), ("small", "DeiT-small"))}})

# ------------------------------------------------------------------------------------------------ Table 8
_T8 = [_printed_row("8", "DeiT-tiny", _label, toe(_tiny, 0.5, layer=_layer, dataset="imagenet"))
       for _layer, _label in enumerate(printed.rows("8", "DeiT-tiny"))]

# ------------------------------------------------------------------------------------------------ Table 9
_T9 = []
for _label, _dist in (("Manhattan distance", "manhattan"), ("Euclidean distance", "euclidean"),
                      ("Cosine distance", "cosine")):
    _T9.append({"label": _label, "columns": {
        _group: {"match": toe(DEIT[_size], 0.5, distance=_dist, dataset="imagenet"),
                 "top1": printed.value("9", _group, _label, "top1")}
        for _size, _group in (("tiny", "DeiT-tiny"), ("small", "DeiT-small"))}})


TABLES: Dict[str, Dict[str, Any]] = {
    "2": {"title": "Table 2. DeiT on ImageNet-1K", "script": "scripts/table2_deit.sh", "layout": "main",
          "metric": "test_acc1", "rows": _T2},
    "3": {"title": "Table 3. LV-ViT on ImageNet-1K (token labeling, EMA)", "script": "scripts/table3_lvvit.sh",
          "layout": "main", "metric": "ema_test_acc1", "rows": _T3},
    "4": {"title": "Table 4. EfficientTrain and EfficientTrain + ToE on ImageNet-1K (DeiT, global batch 4096)",
          "script": "scripts/table4_efficienttrain.sh", "layout": "main", "metric": "test_acc1", "rows": _T4,
          "note": "EfficientTrain's recipe (global batch 4096, lr 4e-3, 20 warm-up epochs, clip-grad 5) for all "
                  "three rows, the baseline without the curriculum; GFLOPs per iteration at batch 4096, averaged "
                  "over the curriculum's input sizes and ToE's stages; the paper timed these runs on 8 GPUs. "
                  "DeiT-tiny's printed 8.8e3 / 7.6e3 are 1.4% / 2.1% above thop's count (8.68e3 / 7.44e3; "
                  "see python -m toe.flops --paper-tables --tables 4)"},
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

def _all_rows(table: str) -> List[tuple]:
    """(group, label) of every printed row of ``table``, in the paper's order."""
    return [(group, label) for group in printed.groups(table) for label in printed.rows(table, group)]


def _hours(table: str, labels: List[tuple]) -> float:
    """Sum of the printed GPU hours of the (group, label) rows of ``table``, in the given order."""
    return sum(printed.value(table, group, label, "gpu_hours") for group, label in labels)


# Total GPU hours the paper prints for the runs of each script (RTX A6000). Tables 5, 7 and 9 print no
# times; their estimate counts each run at the time of its model's default ToE run (Table 2), and Table 5's
# fine-tuning has no printed time at all.
_ABOUT_44H = printed.value("6", "DeiT-tiny", "k = 1", "gpu_hours")  # Table 6's caption: every column ~44 h
_T2_TOE = [printed.value("2", group, "ToE r1=0.5", "gpu_hours") for group in ("DeiT-tiny", "DeiT-small")]
PAPER_GPU_HOURS: Dict[str, Optional[float]] = {
    "2": _hours("2", _all_rows("2")),
    "3": _hours("3", _all_rows("3")),
    "4": _hours("4", _all_rows("4")),
    "5": None,
    "6": _ABOUT_44H * 6,
    "7": None,
    "8": _hours("8", [row for row in _all_rows("8") if "layer 1" not in row[1]]),  # layer 1 is Table 2's run
    "9": None,
}
ESTIMATED_GPU_HOURS: Dict[str, float] = {
    "6": _ABOUT_44H * 6,                     # six new runs (the default is shared with Table 2)
    "7": 5 * _T2_TOE[0] + 5 * _T2_TOE[1],    # five new runs per model (3 seeds of random init + 2 ablations)
    "9": 2 * _T2_TOE[0] + 2 * _T2_TOE[1],    # two new distances per model
}


def paper_value(table: str, label: str, key: str = "top1", column: Optional[str] = None) -> Any:
    """The paper's printed ``key`` of the row ``label`` of ``table`` (column ``column`` for column layouts)."""
    for row in TABLES[table]["rows"]:
        if row["label"] == label:
            if column is not None:
                return row["columns"][column][key]
            return row["paper"][key]
    raise KeyError(f"table {table} has no row {label!r}")
