"""The paper's tables filled with the runs that fit them: one cell per row and column, next to the paper's
printed numbers (``report.paper_results``). A fitting run fills the rows whose configuration it matches
(model, data set, token labeling, fine-tuning source and every ToE setting, see ``report.runargs.run_config``;
folder names play no part).

Per row, measured | paper:
  * Top-1: the best validation top-1 over the logged epochs (DeiT's "max accuracy"; the EMA model's for
    Table 3, as the paper reports LV-ViT with EMA), the mean +- std when several runs match (seeds), and the
    difference to the row group's baseline where the paper prints one (Tables 2, 3, 5);
  * GFLOPs per training iteration: ``toe.flops.gflops_per_iteration`` for the run's model, input size, global
    batch and ToE schedule, with the theoretical speed-up over the baseline; ``[log]`` where it is the mean of
    the ``gflops_per_iter`` values main.py logged (``--no-flops``, a model toe.flops cannot count, a
    curriculum);
  * total GPU hours: the sum over epochs of ``epoch_time`` x ``world_size``, and the practical acceleration =
    baseline GPU hours / GPU hours.
A run that has not finished all its epochs is marked ``*``. Where runs of both ``--toe-compat`` variants fill
a row, it is printed twice; the paper's numbers stand next to the official-code row (Table 9 always prints
both, as its script trains both)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from report import paper_results
from report.recipes import references
from report.runargs import matches
from report.runs import Run

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
        self.final_top1, _ = _agg(ms, "final_top1")
        self.gflops, _ = _agg(ms, "gflops")
        sources = {m["gflops_source"] for m in ms if m["gflops_source"]}
        self.gflops_source = None if not sources else sources.pop() if len(sources) == 1 else "mixed"
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


def gflops_text(cell: Cell) -> str:
    """Measured GFLOPs/iter; ``[log]`` when (some of) it is the logged value rather than toe.flops's count."""
    return _sci(cell.gflops) + (" [log]" if cell.gflops_source in ("log", "mixed") else "")


def hours_text(v: Optional[float]) -> str:
    """GPU hours: 44.2 for real runs; short smoke runs keep 3 significant digits instead of 0.0."""
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 0.1 else f"{v:.2e}"


def ratio_text(num: Optional[float], den: Optional[float]) -> str:
    return f"{num / den:.2f}x" if num and den else "–"


def top1_text(cell: Cell, base: Optional[Cell] = None, delta: bool = True, want_ema: bool = False,
          value: str = "top1") -> str:
    """Measured top-1 cell text: mean [± std] [(delta to the baseline)] [n=runs] [* unfinished]; ``value``
    'final_top1' for the last epoch's."""
    v = getattr(cell, value)
    if cell.empty or v is None:
        return "–"
    s = f"{v:.2f}"
    if value == "top1" and cell.top1_std is not None:
        s += f" ± {cell.top1_std:.2f}"
    b = None if base is None or base.empty or base is cell else getattr(base, value)
    if delta and b is not None:
        s += f" ({v - b:+.2f})"
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


_EXACT, _OFFICIAL = " [exact]", " [official code]"


def _variants(tid: str, specs: List[Dict[str, Any]], runs: List[Run]) -> List[Tuple[str, Optional[str], bool]]:
    """How a row of ToE ``specs`` is printed: (label suffix, --toe-compat its runs must have (None: any),
    whether the paper's numbers stand next to it). Table 9 always has an exact and an official-code row;
    elsewhere a row splits when runs of both variants fill it (the paper's numbers go with the official
    code, with which the authors trained)."""
    if not any(spec.get("toe") for spec in specs):
        return [("", None, True)]
    if tid == "9":
        return [(_EXACT, "none", False), (_OFFICIAL, "official", True)]
    found = {r.config.get("compat") for r in runs if any(matches(r.config, spec) for spec in specs)}
    if found == {"none", "official"}:
        return [("", "none", False), (_OFFICIAL, "official", True)]
    if found == {"official"}:
        return [(_OFFICIAL, "official", True)]
    return [("", None, True)]


def _with(spec: Dict[str, Any], compat: Optional[str]) -> Dict[str, Any]:
    return spec if compat is None else {**spec, "compat": compat}


def _main_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Tables 2, 3 (and 4): a baseline and ToE rows per model, with GFLOPs, GPU hours and speed-ups."""
    metric = spec["metric"]
    header = ["Model", "Method", "Top-1 (%)", "paper", "GFLOPs/iter", "paper", "GPU hours", "paper",
              "Accel. (practical)", "paper", "runs"]
    out, cells, bases = [], {}, {}
    for row in spec["rows"]:
        base_p = next(r["paper"]["top1"] for r in spec["rows"] if r["group"] == row["group"])
        for suffix, compat, show in _variants(tid, [row["match"]], runs):
            cell = _cell(runs, _with(row["match"], compat), metric, use_flops)
            base = bases.setdefault(row["group"], cell)  # the group's first row is its baseline
            p = row["paper"] if show else {}
            gf = gflops_text(cell)
            if cell.gflops and base.gflops and cell is not base:
                gf += f" ({base.gflops / cell.gflops:.2f}x)"
            pgf = _sci(p.get("gflops"), paper=True) + (f" ({p['gflops_speedup']:.2f}x)" if p.get("gflops_speedup") else "")
            out.append([row["group"], row["label"] + suffix, top1_text(cell, base, want_ema=metric == "ema_test_acc1"),
                        _paper_top1(p.get("top1"), None if cell is base else base_p), gf, pgf,
                        hours_text(cell.gpu_hours), _f(p.get("gpu_hours"), "{:.1f}h"),
                        ratio_text(base.gpu_hours, cell.gpu_hours) if cell is not base else "–",
                        _f(p.get("acceleration"), "{:.2f}x"), _runs(cell)])
            cells[f"{row['group']} {row['label']}{suffix}"] = cell_json(cell)
    return header, out, cells


def _cifar_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Table 5: CIFAR-10 and CIFAR-100 top-1 per (pre-training, fine-tuning) pair, fine-tuning hours."""
    metric = spec["metric"]
    header = ["Model", "Pre-training", "Fine-tuning", "CIFAR-10 top-1", "paper", "CIFAR-100 top-1", "paper",
              "FT GPU hours (C10+C100)", "FT accel. (practical)", "paper", "runs"]
    out, cells = [], {}
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
            line += [top1_text(cell, base), _paper_top1(col["top1"], None if cell is base else base_p, decimals=2)]
            if cell.gpu_hours is not None:
                hours.append(cell.gpu_hours)
            all_cells.append(cell)
            cells[f"{row['group']} {row['label']} {ds}"] = cell_json(cell)
        total = sum(hours) if len(hours) == 2 else None
        key = (row["group"], row["pretrain"])
        if row["finetune"] == "baseline":
            ft_base_hours[key] = total
        line += [hours_text(total), ratio_text(ft_base_hours.get(key), total),
                 f"{row['paper']['finetune_acceleration']:.1f}x", "+".join(_runs(c) for c in all_cells)]
        out.append(line)
    return header, out, cells


def _list_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Tables 6 and 8: one setting per row, with GFLOPs and GPU hours."""
    header = ["Setting", "Top-1 (%)", "paper", "GFLOPs/iter", "paper", "GPU hours", "paper", "runs"]
    out, cells = [], {}
    for row in spec["rows"]:
        for suffix, compat, show in _variants(tid, [row["match"]], runs):
            cell = _cell(runs, _with(row["match"], compat), spec["metric"], use_flops)
            p = row["paper"] if show else {}
            out.append([row["label"] + suffix, top1_text(cell, delta=False), _paper_top1(p.get("top1")),
                        gflops_text(cell), _sci(p.get("gflops"), paper=True), hours_text(cell.gpu_hours),
                        _f(p.get("gpu_hours"), "{:.1f}h"), _runs(cell)])
            cells[row["label"] + suffix] = cell_json(cell)
    return header, out, cells


def _column_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Tables 7 and 9: one setting per row, top-1 of DeiT-tiny and DeiT-small side by side."""
    cols = list(spec["rows"][0]["columns"])
    header = ["Setting"] + [h for c in cols for h in (f"{c} top-1", "paper")] + ["runs"]
    out, cells = [], {}
    for row in spec["rows"]:
        specs = [row["columns"][c]["match"] for c in cols]
        for suffix, compat, show in _variants(tid, specs, runs):
            line, counts = [row["label"] + suffix], []
            for c in cols:
                col = row["columns"][c]
                cell = _cell(runs, _with(col["match"], compat), spec["metric"], use_flops)
                line += [top1_text(cell, delta=False),
                         _paper_top1(col["top1"], std=col.get("std")) if show else "–"]
                counts.append(_runs(cell))
                cells[f"{row['label']}{suffix} {c}"] = cell_json(cell)
            out.append(line + ["+".join(counts)])
    return header, out, cells


_LAYOUTS = {"main": _main_rows, "cifar": _cifar_rows, "list": _list_rows, "columns": _column_rows}


def build_table(tid: str, runs: List[Run], use_flops: bool) -> Dict[str, Any]:
    """One paper table filled with the runs that fit it: {'table', 'title', 'header', 'rows' (lists of str),
    'notes', 'cells' (label -> measured dicts, for --json)}."""
    spec = paper_results.TABLES[tid]
    fitting = [r for r in runs if tid in r.fits]
    header, out_rows, cells = _LAYOUTS[spec["layout"]](tid, spec, fitting, use_flops)
    notes: List[str] = []
    if not references(tid):
        notes.append(f"no run can fill this table: its script {spec.get('script') or '(none)'} is missing or fails")
    if any("*" in c for r in out_rows for c in r[1:-1]):
        notes.append("* run not finished: fewer epochs logged than --epochs")
    if any("[log]" in c for r in out_rows for c in r):
        notes.append("[log]: GFLOPs logged by main.py (toe.flops could not count the run, or --no-flops)")
    if any(_OFFICIAL in r[0] or _OFFICIAL in r[1] for r in out_rows):
        notes.append(f"{_OFFICIAL.strip()}: --toe-compat official runs, which behave as the code the paper's numbers "
                     f"come from (so the paper's numbers stand next to them); {_EXACT.strip()} and unmarked ToE "
                     "rows: --toe-compat none, the paper's equations")
    if spec.get("note"):
        notes.append(f"paper: {spec['note']}")
    notes.append("top-1: best over the logged epochs" + (" of the EMA model" if spec["metric"] == "ema_test_acc1"
                                                         else "")
                 + "; GPU hours: sum of epoch training time x processes; paper timings on RTX A6000")
    return {"table": tid, "title": spec["title"], "header": header, "rows": out_rows, "notes": notes,
            "cells": cells}


def _runs(cell: Cell) -> str:
    return str(cell.n) if cell.n else "0"


def cell_json(cell: Cell) -> Dict[str, Any]:
    return {"runs": [r.path for r in cell.runs], "top1": cell.top1, "top1_std": cell.top1_std,
            "final_top1": cell.final_top1, "gflops": cell.gflops, "gflops_source": cell.gflops_source,
            "gpu_hours": cell.gpu_hours, "complete": cell.complete if cell.n else None}


