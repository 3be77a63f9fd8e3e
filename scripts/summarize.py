#!/usr/bin/env python
"""Turn finished (or running) training runs into the ToE paper's tables, next to the paper's numbers.

    python scripts/summarize.py OUT [OUT ...] [--tables 2,3,5,6,7,8,9] [--markdown FILE] [--plots DIR]
                                [--json FILE] [--no-flops]

Every folder under the given paths that holds a ``log.txt`` (main.py's JSON lines, one per epoch) is a run.
Its arguments come from ``args.json`` when present, else from the ``args`` entry of its ``checkpoint.pth``
(``best_checkpoint.pth``), read with ``torch.load(weights_only=True, mmap=True)``. Each run is placed in the
table rows whose configuration it matches (model, data set, token labeling, fine-tuning source and every ToE
setting, see :func:`run_config`; folder names play no part), so runs shared by several tables (e.g. DeiT-tiny
ToE r1=0.5) appear in each.

Per row it reports, measured | paper:
  * Top-1: the best validation top-1 over the logged epochs (DeiT's "max accuracy"; the EMA model's for
    Table 3, as the paper reports LV-ViT with EMA), the mean +- std when several runs match (seeds), and the
    difference to the row group's baseline where the paper prints one (Tables 2, 3, 5);
  * GFLOPs per training iteration: ``toe.flops.gflops_per_iteration`` for the run's model, input size, global
    batch and ToE schedule (thop forward x 3 x batch, averaged over the stages as the paper does), with the
    theoretical speed-up over the baseline; ``--no-flops`` (or a model toe.flops cannot build) uses the mean of
    the ``gflops_per_iter`` values logged by main.py instead;
  * total GPU hours: the sum over epochs of the training wall time (``epoch_time``) x the number of processes
    (``world_size``), and the practical acceleration = baseline GPU hours / GPU hours.
A run that has not finished all its epochs is marked with ``*``.

``--plots DIR`` draws (matplotlib, optional) Fig. 3 (validation top-1 per epoch, baseline vs ToE, one PNG per
model) and Fig. 4 (top-1 against practical and theoretical acceleration over r1, one PNG per model).
Bad input (a missing path, no log.txt anywhere under a path, no readable run) -> one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import paper_results  # noqa: E402

PROG = "summarize.py"
EXIT_USAGE = 2


class InputError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# =============================================================================================== reading
def read_log(path: str) -> List[Dict[str, Any]]:
    """log.txt -> the epoch rows (dicts), sorted by epoch, last row kept per epoch; torn lines dropped."""
    rows: Dict[int, Dict[str, Any]] = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


_ARGS_CACHE: Dict[str, Optional[Dict[str, Any]]] = {}


def _checkpoint_args(path: str) -> Optional[Dict[str, Any]]:
    """The plain-dict ``args`` saved in a main.py checkpoint, or None if the file has none / is unreadable."""
    if path in _ARGS_CACHE:
        return _ARGS_CACHE[path]
    args = None
    if os.path.isfile(path):
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip checkpoint (mmap needs one), unsafe content, truncated file
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                ckpt = None
        if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict):
            args = dict(ckpt["args"])
    _ARGS_CACHE[path] = args
    return args


def load_args(run_dir: str) -> Optional[Dict[str, Any]]:
    """A run's arguments: run_dir/args.json, else the checkpoint's saved args; None when neither exists."""
    path = os.path.join(run_dir, "args.json")
    if os.path.isfile(path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                args = json.load(f)
            if isinstance(args, dict):
                return args
        except (OSError, json.JSONDecodeError):
            pass
    for name in ("checkpoint.pth", "best_checkpoint.pth"):
        args = _checkpoint_args(os.path.join(run_dir, name))
        if args is not None:
            return args
    return None


def find_runs(paths: Sequence[str]) -> List[str]:
    """Every folder holding a log.txt under ``paths`` (deduplicated, sorted). InputError on a missing path or a
    path with no log.txt under it."""
    found: List[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f"no such file or directory: {path}")
        if os.path.isfile(path):
            if os.path.basename(path) != "log.txt":
                raise InputError(f"not a run folder or log.txt: {path}")
            here = [os.path.dirname(os.path.abspath(path))]
        else:
            here = [os.path.abspath(d) for d, _, files in os.walk(path) if "log.txt" in files]
        if not here:
            raise InputError(f"no log.txt under {path}")
        found.extend(here)
    return sorted(set(os.path.realpath(p) for p in found))


# ======================================================================================= configuration
_NB_CLASSES = {"IMNET": 1000, "CIFAR10": 10, "CIFAR100": 100, "INAT18": 8142, "INAT19": 1010}


def nb_classes(args: Dict[str, Any]) -> int:
    """Classes of the run's data set (FAKE: --nb-classes; IMNET/FOLDER: class folders of train/ if readable)."""
    ds = str(args.get("data_set", "IMNET")).upper()
    if ds in ("IMNET", "FOLDER") and args.get("data_path"):
        train = os.path.join(str(args["data_path"]), "train")
        if os.path.isdir(train):
            n = sum(1 for e in os.scandir(train) if e.is_dir())
            if n:
                return n
    if ds in _NB_CLASSES:
        return _NB_CLASSES[ds]
    return int(args.get("nb_classes") or 1000)


def toe_on(args: Dict[str, Any]) -> bool:
    r1 = args.get("toe_r1")
    return r1 is not None and float(r1) < 1.0


def run_config(args: Dict[str, Any]) -> Dict[str, Any]:
    """The configuration a table row is matched on, from a run's args.

    Keys: model, dataset ('imagenet' for everything that is not CIFAR: IMNET, and FAKE/FOLDER in smoke
    runs), token_label, finetune_from ('baseline' / 'toe' from the fine-tuning checkpoint's own args,
    'unknown' if unreadable, None without --finetune), seed, toe, and with ToE on: r1, r0_ratio (r0 / r1),
    ng, k, layer, distance, init, expand, merge.
    """
    ds = str(args.get("data_set", "IMNET")).upper()
    cfg: Dict[str, Any] = {
        "model": args.get("model"),
        "dataset": {"CIFAR10": "cifar10", "CIFAR100": "cifar100"}.get(ds, "imagenet"),
        "token_label": bool(args.get("token_label", False)),
        "finetune_from": None,
        "seed": args.get("seed"),
        "toe": toe_on(args),
    }
    ft = args.get("finetune") or ""
    if ft:
        src = _checkpoint_args(ft) if os.path.isfile(ft) else None
        if src is None:
            src = load_args(os.path.dirname(ft)) if os.path.isdir(os.path.dirname(ft) or ".") else None
        cfg["finetune_from"] = "unknown" if src is None else ("toe" if toe_on(src) else "baseline")
    if cfg["toe"]:
        r1 = float(args["toe_r1"])
        r0 = float(args["toe_r0"]) if args.get("toe_r0") is not None else r1 / 2
        cfg.update({"r1": r1, "r0_ratio": r0 / r1, "ng": int(args.get("toe_ng", 3)), "k": int(args.get("toe_k", 2)),
                    "layer": int(args.get("toe_layer", 1)), "distance": args.get("toe_distance", "cosine"),
                    "init": args.get("toe_init", "spatial"), "expand": not args.get("toe_no_expand", False),
                    "merge": not args.get("toe_no_merge", False)})
    return cfg


def matches(cfg: Dict[str, Any], spec: Dict[str, Any]) -> bool:
    """True when every key of ``spec`` equals the run's config (floats to 1e-3)."""
    for key, want in spec.items():
        have = cfg.get(key)
        if isinstance(want, float) and not isinstance(want, bool):
            if not isinstance(have, (int, float)) or abs(float(have) - want) > 1e-3:
                return False
        elif have != want:
            return False
    return True


# ============================================================================================= metrics
_FLOPS_CACHE: Dict[str, Optional[float]] = {}


def _flops_from_toe(args: Dict[str, Any], global_batch: int) -> Optional[float]:
    """GFLOPs per training iteration of the run's model and ToE schedule, via toe.flops (None if it fails)."""
    key = json.dumps([args.get(k) for k in ("model", "model_kwargs", "patch_size", "input_size", "data_set",
                                            "nb_classes", "toe_r1", "toe_r0", "toe_ng", "toe_k", "toe_layer",
                                            "toe_epochs", "epochs", "toe_stage_epochs")] + [global_batch],
                     sort_keys=True, default=str)
    if key in _FLOPS_CACHE:
        return _FLOPS_CACHE[key]
    value = None
    try:
        import main as train_main
        import toe
        from toe import flops

        ns = argparse.Namespace(**{"model_kwargs": {}, "patch_size": None, **args})
        import models  # noqa: F401  (registers LV-ViT with timm)

        model = train_main.create_model(args["model"], nb_classes(args), int(args.get("input_size", 224)),
                                        train_main.model_kwargs(ns))
        schedule = None
        if toe_on(args):
            stage_epochs = args.get("toe_stage_epochs")
            schedule = toe.Schedule(r1=float(args["toe_r1"]), ng=int(args.get("toe_ng", 3)),
                                    k=int(args.get("toe_k", 2)), r0=args.get("toe_r0"),
                                    epochs=int(args.get("toe_epochs") or args.get("epochs", 300)),
                                    stage_epochs=tuple(stage_epochs) if stage_epochs else None)
        res = flops.gflops_per_iteration(model, schedule, layer=int(args.get("toe_layer", 1)),
                                         batch_size=global_batch, img_size=int(args.get("input_size", 224)))
        value = float(res["gflops"])
    except Exception as e:  # a model this checkout cannot build, an old toe.flops: fall back to the log
        warn(f"toe.flops failed for {args.get('model')} ({type(e).__name__}: {e}); using the logged GFLOPs")
    _FLOPS_CACHE[key] = value
    return value


def summarize_run(run_dir: str, rows: List[Dict[str, Any]], args: Dict[str, Any], metric: str,
                  use_flops: bool = True) -> Dict[str, Any]:
    """Metrics of one run for a table whose top-1 is ``metric`` ('test_acc1' or 'ema_test_acc1')."""
    world = int(args.get("world_size") or 1)
    global_batch = int(args.get("batch_size", 1)) * world * int(args.get("grad_accum_steps") or 1)
    used = metric
    if not any(isinstance(r.get(metric), (int, float)) for r in rows):
        used = "test_acc1"  # e.g. EMA off: fall back to the model's own accuracy
    accs = [float(r[used]) for r in rows if isinstance(r.get(used), (int, float))]
    times = [float(r["epoch_time"]) for r in rows if isinstance(r.get("epoch_time"), (int, float))]
    logged = [float(r["gflops_per_iter"]) for r in rows if isinstance(r.get("gflops_per_iter"), (int, float))]
    gflops = _flops_from_toe(args, global_batch) if use_flops else None
    epochs_total = int(args.get("epochs", len(rows)))
    return {
        "run": run_dir, "epochs_done": len(rows), "epochs_total": epochs_total,
        "complete": bool(rows) and rows[-1]["epoch"] >= epochs_total - 1,
        "metric": used, "top1": max(accs) if accs else None, "final_top1": accs[-1] if accs else None,
        "curve": [(int(r["epoch"]), float(r[used])) for r in rows if isinstance(r.get(used), (int, float))],
        "gpu_hours": sum(times) * world / 3600.0 if times else None, "world_size": world,
        "global_batch": global_batch,
        "gflops": gflops if gflops is not None else (sum(logged) / len(logged) if logged else None),
        "gflops_source": "toe.flops" if gflops is not None else ("log" if logged else None),
    }


class Run:
    """One run folder: its log rows, args and matching configuration."""

    def __init__(self, path: str, rows: List[Dict[str, Any]], args: Dict[str, Any]) -> None:
        self.path = path
        self.rows = rows
        self.args = args
        self.config = run_config(args)
        self._metrics: Dict[Tuple[str, bool], Dict[str, Any]] = {}

    def metrics(self, metric: str, use_flops: bool) -> Dict[str, Any]:
        key = (metric, use_flops)
        if key not in self._metrics:
            self._metrics[key] = summarize_run(self.path, self.rows, self.args, metric, use_flops)
        return self._metrics[key]


def load_runs(paths: Sequence[str]) -> List[Run]:
    """All readable runs under ``paths``; a run folder without rows or args is skipped with a warning."""
    runs: List[Run] = []
    for d in find_runs(paths):
        rows = read_log(os.path.join(d, "log.txt"))
        if not rows:
            warn(f"skipping {d}: log.txt has no epoch yet")
            continue
        args = load_args(d)
        if args is None:
            warn(f"skipping {d}: no args.json and no readable checkpoint.pth with saved args")
            continue
        runs.append(Run(d, rows, args))
    if not runs:
        raise InputError(f"no readable run (log.txt with epochs + args) under {', '.join(paths)}")
    return runs


# ============================================================================================== tables
def _agg(ms: List[Dict[str, Any]], key: str) -> Tuple[Optional[float], Optional[float]]:
    vals = [m[key] for m in ms if m.get(key) is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, std


class Cell:
    """The runs of one table cell, aggregated (mean over matching runs; std of top-1 when several)."""

    def __init__(self, runs: List[Run], metric: str, use_flops: bool) -> None:
        self.runs = runs
        ms = [r.metrics(metric, use_flops) for r in runs]
        self.n = len(ms)
        self.top1, self.top1_std = _agg(ms, "top1")
        self.gflops, _ = _agg(ms, "gflops")
        self.gpu_hours, _ = _agg(ms, "gpu_hours")
        self.complete = all(m["complete"] for m in ms)
        self.epochs = [(m["epochs_done"], m["epochs_total"]) for m in ms]
        self.metric = {m["metric"] for m in ms}
        self.measured = ms

    @property
    def empty(self) -> bool:
        return self.n == 0


def _cell(runs: List[Run], spec: Dict[str, Any], metric: str, use_flops: bool) -> Cell:
    return Cell([r for r in runs if matches(r.config, spec)], metric, use_flops)


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _sci(v: Optional[float], paper: bool = False) -> str:
    """3.3e3-style, as the paper prints GFLOPs (paper values without trailing zeros)."""
    if v is None:
        return "–"
    mant, exp = f"{v:.2e}".split("e")
    if paper:
        mant = mant.rstrip("0")
        mant = mant + "0" if mant.endswith(".") else mant
    return f"{mant}e{int(exp)}"


def _hours(v: Optional[float]) -> str:
    """GPU hours: 44.2 for real runs; short smoke runs keep 3 significant digits instead of 0.0."""
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 0.1 else f"{v:.2e}"


def _top1(cell: Cell, base: Optional[Cell] = None, delta: bool = True, want_ema: bool = False) -> str:
    """Measured top-1 cell text: mean [± std] [(delta to the baseline)] [n=runs] [* unfinished]."""
    if cell.empty or cell.top1 is None:
        return "–"
    s = f"{cell.top1:.2f}"
    if cell.top1_std is not None:
        s += f" ± {cell.top1_std:.2f}"
    if delta and base is not None and not base.empty and base.top1 is not None and base is not cell:
        s += f" ({cell.top1 - base.top1:+.2f})"
    if cell.n > 1:
        s += f" [n={cell.n}]"
    if not cell.complete:
        s += " *"
    if want_ema and "ema_test_acc1" not in cell.metric:
        s += " (no EMA)"  # the run logged no EMA accuracy: its own top-1 is shown
    return s


def _paper_top1(value: Optional[float], base: Optional[float] = None, std: Optional[float] = None,
                decimals: int = 1) -> str:
    """The paper's printed top-1 (with its std and its difference to the baseline where it prints them)."""
    if value is None:
        return "–"
    s = f"{value:.{decimals}f}"
    if std is not None:
        s += f" ± {std:g}"
    if base is not None:
        s += f" ({value - base:+.{decimals}f})"
    return s


def build_table(tid: str, runs: List[Run], use_flops: bool) -> Dict[str, Any]:
    """One paper table filled with the matching runs: {'title', 'header', 'rows' (list of str lists),
    'notes', 'cells' (label -> measured dicts, for --json)}."""
    spec = paper_results.TABLES[tid]
    metric = spec["metric"]
    notes: List[str] = []
    out_rows: List[List[str]] = []
    cells_json: Dict[str, Any] = {}
    layout = spec["layout"]

    if layout == "main":
        header = ["Model", "Method", "Top-1 (%)", "paper", "GFLOPs/iter", "paper", "GPU hours", "paper",
                  "Accel. (practical)", "paper", "runs"]
        groups: Dict[str, Cell] = {}
        for row in spec["rows"]:
            cell = _cell(runs, row["match"], metric, use_flops)
            base = groups.setdefault(row["group"], cell)  # the group's first row is its baseline
            p = row["paper"]
            base_p = next(r["paper"]["top1"] for r in spec["rows"] if r["group"] == row["group"])
            gf = _sci(cell.gflops)
            if cell.gflops and base.gflops and cell is not base:
                gf += f" ({base.gflops / cell.gflops:.2f}x)"
            pgf = _sci(p.get("gflops"), paper=True) + (f" ({p['gflops_speedup']:.2f}x)" if p.get("gflops_speedup") else "")
            acc = "–"
            if cell.gpu_hours and base.gpu_hours:
                acc = f"{base.gpu_hours / cell.gpu_hours:.2f}x"
            out_rows.append([row["group"], row["label"], _top1(cell, base, want_ema=metric == "ema_test_acc1"),
                             _paper_top1(p["top1"], None if cell is base else base_p),
                             gf, pgf, _hours(cell.gpu_hours), _f(p.get("gpu_hours"), "{:.1f}h"), acc,
                             _f(p.get("acceleration"), "{:.2f}x"), _runs(cell)])
            cells_json[f"{row['group']} {row['label']}"] = _cell_json(cell)
    elif layout == "cifar":
        header = ["Model", "Pre-training", "Fine-tuning", "CIFAR-10 top-1", "paper", "CIFAR-100 top-1", "paper",
                  "FT GPU hours (C10+C100)", "FT accel. (practical)", "paper", "runs"]
        bases: Dict[Tuple[str, str], Cell] = {}
        ft_base_hours: Dict[Tuple[str, str], Optional[float]] = {}
        for row in spec["rows"]:
            line = [row["group"], row["label"].split(" / ")[0][4:], row["label"].split(" / ")[1][3:]]
            hours: List[float] = []
            all_cells = []
            for ds in ("cifar10", "cifar100"):
                col = row["columns"][ds]
                cell = _cell(runs, col["match"], metric, use_flops)
                base = bases.setdefault((row["group"], ds), cell)
                base_p = spec["rows"][[r["group"] for r in spec["rows"]].index(row["group"])]["columns"][ds]["top1"]
                line += [_top1(cell, base), _paper_top1(col["top1"], None if cell is base else base_p, decimals=2)]
                if cell.gpu_hours is not None:
                    hours.append(cell.gpu_hours)
                all_cells.append(cell)
                cells_json[f"{row['group']} {row['label']} {ds}"] = _cell_json(cell)
            total = sum(hours) if len(hours) == 2 else None
            key = (row["group"], row["pretrain"])
            if row["finetune"] == "baseline":
                ft_base_hours[key] = total
            fb = ft_base_hours.get(key)
            line += [_hours(total), f"{fb / total:.2f}x" if fb and total else "–",
                     f"{row['paper']['finetune_acceleration']:.1f}x",
                     "+".join(_runs(c) for c in all_cells)]
            out_rows.append(line)
    elif layout == "list":
        header = ["Setting", "Top-1 (%)", "paper", "GFLOPs/iter", "paper", "GPU hours", "paper", "runs"]
        for row in spec["rows"]:
            cell = _cell(runs, row["match"], metric, use_flops)
            p = row["paper"]
            line = [row["label"], _top1(cell, delta=False), _paper_top1(p.get("top1"))]
            line += [_sci(cell.gflops), _sci(p.get("gflops"), paper=True)]
            line += [_hours(cell.gpu_hours), _f(p.get("gpu_hours"), "{:.1f}h"), _runs(cell)]
            out_rows.append(line)
            cells_json[row["label"]] = _cell_json(cell)
    elif layout == "columns":
        cols = list(spec["rows"][0]["columns"])
        header = ["Setting"] + [h for c in cols for h in (f"{c} top-1", "paper")] + ["runs"]
        for row in spec["rows"]:
            line = [row["label"]]
            rs = []
            for c in cols:
                col = row["columns"][c]
                cell = _cell(runs, col["match"], metric, use_flops)
                line += [_top1(cell, delta=False), _paper_top1(col["top1"], std=col.get("std"))]
                rs.append(_runs(cell))
                cells_json[f"{row['label']} {c}"] = _cell_json(cell)
            out_rows.append(line + ["+".join(rs)])
    else:  # pragma: no cover - paper_results defines the layouts
        raise ValueError(f"unknown layout {layout!r}")

    if any("*" in c for r in out_rows for c in r[1:-1]):
        notes.append("* run not finished: fewer epochs logged than --epochs")
    if spec.get("note"):
        notes.append(f"paper: {spec['note']}")
    notes.append("top-1: best over the logged epochs" + (" of the EMA model" if metric == "ema_test_acc1" else "")
                 + "; GPU hours: sum of epoch training time x processes; paper timings on RTX A6000")
    return {"table": tid, "title": spec["title"], "header": header, "rows": out_rows, "notes": notes,
            "cells": cells_json}


def _runs(cell: Cell) -> str:
    return str(cell.n) if cell.n else "0"


def _cell_json(cell: Cell) -> Dict[str, Any]:
    return {"runs": [r.path for r in cell.runs], "top1": cell.top1, "top1_std": cell.top1_std,
            "gflops": cell.gflops, "gpu_hours": cell.gpu_hours, "complete": cell.complete if cell.n else None}


def render_text(table: Dict[str, Any]) -> str:
    """Aligned plain-text rendering."""
    rows = [table["header"]] + table["rows"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table["header"]))]
    lines = [table["title"], ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [""] + [f"  {n}" for n in table["notes"]]
    return "\n".join(lines)


def render_markdown(table: Dict[str, Any]) -> str:
    """GitHub markdown rendering."""
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = [f"### {table['title']}", "", "| " + " | ".join(map(esc, table["header"])) + " |",
             "|" + "|".join("---" for _ in table["header"]) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in table["rows"]]
    lines += [""] + [f"- {n}" for n in table["notes"]]
    return "\n".join(lines) + "\n"


# =============================================================================================== plots
_MODEL_NAMES = {**{v: f"DeiT-{k}" for k, v in paper_results.DEIT.items()},
                **{v: f"LV-ViT-{k}" for k, v in paper_results.LVVIT.items()}}


def _default_toe(cfg: Dict[str, Any]) -> bool:
    return cfg["toe"] and matches(cfg, paper_results.TOE_DEFAULTS)


def plot_groups(runs: List[Run]) -> Dict[Tuple[str, bool], Dict[str, List[Run]]]:
    """(model, token_label) -> {'baseline': [...], 'toe': [...]} for ImageNet runs from scratch with the
    paper's default ToE settings (any r1)."""
    groups: Dict[Tuple[str, bool], Dict[str, List[Run]]] = {}
    for r in runs:
        c = r.config
        if c["dataset"] != "imagenet" or c["finetune_from"] is not None:
            continue
        if not c["toe"] or _default_toe(c):
            g = groups.setdefault((c["model"], c["token_label"]), {"baseline": [], "toe": []})
            g["toe" if c["toe"] else "baseline"].append(r)
    return {k: v for k, v in groups.items() if v["baseline"] and v["toe"]}


def _finish_plot(plt: Any, fig: Any, ax: Any, title: str, path: str) -> str:
    """Title, grid and legend, then write ``path`` (PNG) and close the figure; returns ``path``."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_plots(runs: List[Run], out_dir: str, use_flops: bool) -> List[str]:
    """Fig. 3 and Fig. 4 PNGs into ``out_dir``; [] with a one-line message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: matplotlib is not installed, so no plots were drawn (pip install matplotlib)",
              file=sys.stderr)
        return []
    groups = plot_groups(runs)
    if not groups:
        print(f"{PROG}: no plots: no model has both a baseline and a ToE run on ImageNet", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    for (model, token_label), g in sorted(groups.items()):
        metric = "ema_test_acc1" if token_label else "test_acc1"
        name = _MODEL_NAMES.get(model, model)
        slug = model + ("_token_label" if token_label else "")

        # Fig. 3: validation top-1 per epoch
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rs in [("Baseline", g["baseline"])] + [
                (f"ToE r1={r.config['r1']:g}", [r]) for r in sorted(g["toe"], key=lambda r: r.config["r1"])]:
            for r in rs:
                curve = r.metrics(metric, use_flops)["curve"]
                ax.plot([e + 1 for e, _ in curve], [a for _, a in curve], label=label,
                        linestyle="-" if label == "Baseline" else "--",
                        marker="o" if len(curve) <= 30 else None)  # short runs: points stay visible
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation top-1 (%)" + (" (EMA)" if token_label else ""))
        written.append(_finish_plot(plt, fig, ax, f"{name}: validation top-1 during training (Fig. 3)",
                                    os.path.join(out_dir, f"fig3_{slug}.png")))

        # Fig. 4: top-1 vs acceleration over r1
        base = Cell(g["baseline"], metric, use_flops)
        by_r1: Dict[float, List[Run]] = {}
        for r in g["toe"]:
            by_r1.setdefault(round(r.config["r1"], 4), []).append(r)
        pts = []
        for r1, rs in sorted(by_r1.items()):
            c = Cell(rs, metric, use_flops)
            prac = base.gpu_hours / c.gpu_hours if base.gpu_hours and c.gpu_hours else None
            theo = base.gflops / c.gflops if base.gflops and c.gflops else None
            pts.append((r1, c.top1, prac, theo))
        fig, ax = plt.subplots(figsize=(6, 4))
        for idx, (kind, lab, marker) in enumerate(((2, "practical (GPU hours)", "o"), (3, "theoretical (GFLOPs)", "s"))):
            xy = sorted([(1.0, base.top1)] + [(p[kind], p[1]) for p in pts if p[kind] is not None and p[1] is not None])
            if base.top1 is None or len(xy) < 2:
                continue
            xs, ys = [x for x, _ in xy], [y for _, y in xy]
            ax.plot(xs, ys, marker=marker, label=lab)
            if idx == 0:
                for p in pts:
                    if p[2] is not None and p[1] is not None:
                        ax.annotate(f"r1={p[0]:g}", (p[2], p[1]), textcoords="offset points", xytext=(4, 4))
        ax.axhline(base.top1 if base.top1 is not None else 0, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel("acceleration over the baseline (x)")
        ax.set_ylabel("top-1 (%)")
        written.append(_finish_plot(plt, fig, ax, f"{name}: acceleration vs top-1 over r1 (Fig. 4)",
                                    os.path.join(out_dir, f"fig4_{slug}.png")))
    return written


# ================================================================================================ main
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Print the ToE paper's tables from training runs (log.txt + args).")
    p.add_argument("paths", nargs="+", metavar="OUT", help="run folders or roots holding them (searched recursively)")
    p.add_argument("--tables", default=",".join(paper_results.TABLES),
                   help=f"comma-separated table ids (default all: {','.join(paper_results.TABLES)})")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown to FILE")
    p.add_argument("--plots", metavar="DIR", help="draw Fig. 3 / Fig. 4 PNGs into DIR (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write the measured cells as JSON to FILE")
    p.add_argument("--no-flops", action="store_true",
                   help="take GFLOPs from the logged gflops_per_iter instead of recomputing with toe.flops")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry; returns the exit code."""
    try:
        args = parse_args(argv)
        tables = [t.strip() for t in args.tables.split(",") if t.strip()]
        unknown = [t for t in tables if t not in paper_results.TABLES]
        if unknown:
            raise InputError(f"--tables: unknown table {', '.join(unknown)} (known: {', '.join(paper_results.TABLES)})")
        runs = load_runs(args.paths)
    except InputError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE

    use_flops = not args.no_flops
    built = [build_table(t, runs, use_flops) for t in tables]
    print(f"{len(runs)} run(s) under {', '.join(args.paths)}\n")
    for t in built:
        print(render_text(t))
        print()
    used = {p for t in built for c in t["cells"].values() for p in c["runs"]}
    other = [r.path for r in runs if r.path not in used]
    if other:
        print(f"{len(other)} run(s) match no row of the tables shown: " + ", ".join(os.path.relpath(p) for p in other))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(render_markdown(t) for t in built))
        print(f"markdown written to {args.markdown}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"tables": built, "runs": [{"run": r.path, "config": r.config,
                                                  **{k: v for k, v in r.metrics("test_acc1", use_flops).items()
                                                     if k != "curve"}} for r in runs]}, f, indent=1, default=str)
    if args.plots:
        for path in draw_plots(runs, args.plots, use_flops):
            print(f"plot written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
