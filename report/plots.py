"""Fig. 3 (top-1 per epoch) and Fig. 4 (top-1 against acceleration) of the runs, with matplotlib."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Tuple

from report import paper_results
from report.common import PROG, YOURS, shown_path
from report.runargs import matches
from report.runs import Run
from report.tables import Cell
from report.yours import method_text, your_groups

# =============================================================================================== plots
_MODEL_NAMES = {**{v: f"DeiT-{k}" for k, v in paper_results.DEIT.items()},
                **{v: f"LV-ViT-{k}" for k, v in paper_results.LVVIT.items()}}


def _default_toe(cfg: Dict[str, Any]) -> bool:
    return cfg["toe"] and matches(cfg, paper_results.TOE_DEFAULTS)


def plot_groups(runs: List[Run]) -> Dict[Tuple[str, bool], Dict[str, List[Run]]]:
    """(model, token_label) -> {'baseline': [...], 'toe': [...]} for the runs that fit a paper table, on
    ImageNet from scratch, with the paper's default ToE settings (any r1)."""
    groups: Dict[Tuple[str, bool], Dict[str, List[Run]]] = {}
    for r in runs:
        c = r.config
        if not r.fits or c["dataset"] != "imagenet" or c["finetune_from"] is not None:
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


def legend_labels(runs: List[Run]) -> List[str]:
    """Each run's label: the Method column's text (baseline / the ToE setting, mixed resumes), with the run's
    folder where two runs would otherwise share a label."""
    labels = [method_text(r) for r in runs]
    return [f"{label} ({shown_path(r.path)})" if labels.count(label) > 1 else label for label, r in zip(labels, runs)]


def _plot_curves(plt: Any, series: List[Tuple[str, Run]], metric: str, use_flops: bool, ylabel: str,
                 title: str, path: str) -> str:
    """Fig. 3: validation top-1 per epoch of each (label, run); the baseline solid, ToE dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in series:
        curve = run.metrics(metric, use_flops)["curve"]
        ax.plot([e + 1 for e, _ in curve], [a for _, a in curve], label=label,
                linestyle="--" if run.config["toe"] else "-",
                marker="o" if len(curve) <= 30 else None)  # short runs: points stay visible
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    return _finish_plot(plt, fig, ax, title, path)


def _plot_speedup(plt: Any, base: Cell, points: List[Tuple[str, Cell]], title: str, path: str) -> str:
    """Fig. 4: top-1 against the practical (GPU hours) and theoretical (GFLOPs) acceleration of each
    (label, cell) over the baseline (1.0x)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for idx, (attr, lab, marker) in enumerate((("gpu_hours", "practical (GPU hours)", "o"),
                                               ("gflops", "theoretical (GFLOPs)", "s"))):
        pts = [(getattr(base, attr) / getattr(c, attr), c.top1, label) for label, c in points
               if getattr(base, attr) and getattr(c, attr) and c.top1 is not None]
        if base.top1 is None or not pts:
            continue
        xy = sorted([(1.0, base.top1)] + [(x, y) for x, y, _ in pts])
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker=marker, label=lab)
        if idx == 0:
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.axhline(base.top1 if base.top1 is not None else 0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("acceleration over the baseline (x)")
    ax.set_ylabel("top-1 (%)")
    return _finish_plot(plt, fig, ax, title, path)


def _setting_points(toes: List[Run], metric: str, use_flops: bool) -> List[Tuple[str, Cell]]:
    """One Fig. 4 point per ToE setting (the runs sharing one Method text, e.g. seeds, averaged), by r1."""
    by_setting: Dict[str, List[Run]] = {}
    for r in sorted(toes, key=lambda r: r.config["r1"]):
        by_setting.setdefault(method_text(r), []).append(r)
    return [(label, Cell(rs, metric, use_flops)) for label, rs in by_setting.items()]


def draw_plots(runs: List[Run], out_dir: str, use_flops: bool) -> List[str]:
    """Fig. 3 and Fig. 4 PNGs into ``out_dir`` for the paper's models and for each group of "Your runs" with
    a baseline and a ToE run; [] with a one-line message when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: matplotlib is not installed, so no plots were drawn (pip install matplotlib)",
              file=sys.stderr)
        return []
    jobs = []  # (file stem, title name, metric, baselines, ToE runs)
    for (model, token_label), g in sorted(plot_groups(runs).items()):
        slug = model + ("_token_label" if token_label else "")
        jobs.append((slug, _MODEL_NAMES.get(model, model), "ema_test_acc1" if token_label else "test_acc1",
                     g["baseline"], g["toe"]))
    for i, (bases, toes) in enumerate(g for g in your_groups(runs) if g[0] and g[1]):
        model = str(bases[0].config["model"])
        jobs.append((f"yours{i + 1}_{model}", f"{YOURS} #{i + 1} ({model})", "test_acc1", bases, toes))
    if not jobs:
        print(f"{PROG}: no plots: no model has both a baseline and a ToE run", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    for stem, name, metric, bases, toes in jobs:
        series = list(zip(legend_labels(bases + toes), bases + toes))
        ylabel = "validation top-1 (%)" + (" (EMA)" if metric == "ema_test_acc1" else "")
        written.append(_plot_curves(plt, series, metric, use_flops, ylabel,
                                    f"{name}: validation top-1 during training (Fig. 3)",
                                    os.path.join(out_dir, f"fig3_{stem}.png")))
        written.append(_plot_speedup(plt, Cell(bases, metric, use_flops), _setting_points(toes, metric, use_flops),
                                     f"{name}: acceleration vs top-1 over r1 (Fig. 4)",
                                     os.path.join(out_dir, f"fig4_{stem}.png")))
    return written


