"""Runs: their log rows and arguments, their measured numbers (top-1, GFLOPs, GPU hours), the tables they
fit, and the first lines of the output that name the runs fitting none."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from training import builders
from runtime import runlog
from runtime.errors import UsageError
from report import paper_results
from report.common import WARNED, YOURS, InputError, flag_name, show_value, shown_path, shown_paths, warn
from report.recipes import NOT_COMPARED, Reference, differences, references, run_recipe, same_value
from report.runargs import curriculum_of, find_runs, global_batch, load_args, nb_classes, run_config, toe_on, world_size

# ============================================================================================= metrics
_FLOPS_CACHE: Dict[str, Tuple[Optional[float], str]] = {}


def _schedule(args: Dict[str, Any]) -> Any:
    """The run's toe.Schedule, or None without ToE."""
    if not toe_on(args):
        return None
    import toe

    stages = args.get("toe_stage_epochs")
    if isinstance(stages, str):
        stages = [int(e) for e in re.split(r"[,\s]+", stages.strip()) if e]
    return toe.Schedule(r1=float(args["toe_r1"]), ng=int(args.get("toe_ng", 3)), k=int(args.get("toe_k", 2)),
                        r0=args.get("toe_r0"), epochs=int(args.get("toe_epochs") or args.get("epochs", 300)),
                        stage_epochs=tuple(stages) if stages else None)


def flops_from_toe(args: Dict[str, Any], batch: int) -> Tuple[Optional[float], str]:
    """(GFLOPs per training iteration of the run's model and ToE schedule by toe.flops, "") or (None, why it
    cannot be counted: a model this checkout does not know or build with these options, a model without
    ToE-countable blocks, an input size that a curriculum changes). Any other error is a bug and raises."""
    key = json.dumps([args.get(k) for k in ("model", "model_kwargs", "patch_size", "input_size", "data_set",
                                            "nb_classes", "toe_r1", "toe_r0", "toe_ng", "toe_k", "toe_layer",
                                            "toe_epochs", "epochs", "toe_stage_epochs", "curriculum",
                                            "curriculum_table")] + [batch], sort_keys=True, default=str)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _count_flops(args, batch)
    return _FLOPS_CACHE[key]


def _count_flops(args: Dict[str, Any], batch: int) -> Tuple[Optional[float], str]:
    if curriculum_of(args):
        return None, "its input size follows a curriculum, toe.flops counts one size"
    import timm

    import models  # noqa: F401  (registers LV-ViT with timm)
    from toe import flops

    name = str(args.get("model"))
    if not timm.is_model(name):
        return None, f"{name} is not a model of this checkout"
    size = int(args.get("input_size") or 224)
    try:
        model = builders.create_model(name, nb_classes(args), size,
                                      builders.model_kwargs(args.get("model_kwargs"), args.get("patch_size")))
    except UsageError as e:  # the model does not take these options
        return None, str(e)
    try:
        res = flops.gflops_per_iteration(model, _schedule(args), layer=int(args.get("toe_layer", 1)),
                                         batch_size=batch, img_size=size)
    except ValueError as e:  # no `blocks` to reduce, or --toe-layer outside them
        return None, str(e)
    return float(res["gflops"]), ""


def summarize_run(run_dir: str, rows: List[Dict[str, Any]], args: Dict[str, Any], metric: str,
                  use_flops: bool = True) -> Dict[str, Any]:
    """Metrics of one run for a table whose top-1 is ``metric`` ('test_acc1' or 'ema_test_acc1');
    ``gflops_source`` says where its GFLOPs come from: 'toe.flops', 'log' (with ``gflops_note`` saying why
    toe.flops did not count them), or None."""
    world = world_size(args)
    batch = global_batch(args)
    used = metric
    if not any(isinstance(r.get(metric), (int, float)) for r in rows):
        used = "test_acc1"  # e.g. EMA off: fall back to the model's own accuracy
    accs = [float(r[used]) for r in rows if isinstance(r.get(used), (int, float))]
    times = [float(r["epoch_time"]) for r in rows if isinstance(r.get("epoch_time"), (int, float))]
    logged = [float(r["gflops_per_iter"]) for r in rows if isinstance(r.get("gflops_per_iter"), (int, float))]
    gflops, note = flops_from_toe(args, batch) if use_flops else (None, "--no-flops")
    source = "toe.flops" if gflops is not None else ("log" if logged else None)
    if gflops is None and logged:
        gflops = sum(logged) / len(logged)
    epochs_total = int(args.get("epochs", len(rows)))
    return {
        "run": run_dir, "epochs_done": len(rows), "epochs_total": epochs_total,
        "complete": bool(rows) and rows[-1]["epoch"] >= epochs_total - 1,
        "metric": used, "top1": max(accs) if accs else None, "final_top1": accs[-1] if accs else None,
        "curve": [(int(r["epoch"]), float(r[used])) for r in rows if isinstance(r.get(used), (int, float))],
        "gpu_hours": sum(times) * world / 3600.0 if times else None, "world_size": world,
        "global_batch": batch, "gflops": gflops, "gflops_source": source,
        "gflops_note": note if source == "log" else "",
    }


# Changed on a resume without changing what is trained: the global batch they make up is logged as a change
# of its own when it changes.
_SAME_TRAINING = NOT_COMPARED | {"batch_size", "grad_accum_steps"}


def resumed_changes(notices: Sequence[Dict[str, Any]]) -> List[str]:
    """The log's ``{"resumed_with_changes": {flag: [old, new]}, "epoch": E}`` rows as text, one per resume
    that changed what the run trains, e.g. ``toe_r1 0.5 -> 0.4 at epoch 3``: such a run is a mixture."""
    out = []
    for row in notices:
        changes = row.get("resumed_with_changes")
        if not isinstance(changes, dict):
            continue
        said = [f"{flag} {show_value(pair[0])} -> {show_value(pair[1])}" for flag, pair in changes.items()
                if flag not in _SAME_TRAINING and isinstance(pair, (list, tuple)) and len(pair) == 2
                and not same_value(pair[0], pair[1])]
        if said:
            out.append(", ".join(said) + f" at epoch {row.get('epoch', '?')}")
    return out


class Run:
    """One run folder: its log rows, args, matching configuration and the tables it fits. ``mixed`` names
    each resume that changed its training (log.txt's notices): such a run fits no paper table."""

    def __init__(self, path: str, rows: List[Dict[str, Any]], args: Dict[str, Any],
                 notices: Sequence[Dict[str, Any]] = ()) -> None:
        self.path = path
        self.rows = rows
        self.args = args
        self.mixed = resumed_changes(notices)
        self.config = run_config(args)
        self.recipe = run_recipe(args)
        self.fits: Set[str] = set()
        self.closest: Optional[Reference] = None
        self.diffs: List[Tuple[str, Any, Any]] = []
        self._metrics: Dict[Tuple[str, bool], Dict[str, Any]] = {}

    def place(self, tables: Iterable[str]) -> None:
        """Find the tables whose scripts hold a command with this run's recipe; without one, keep the
        closest command (fewest differences; the first table wins a tie) and the differences."""
        best: Optional[Tuple[float, Reference, List[Tuple[str, Any, Any]]]] = None
        for table in tables:
            for ref in references(table):
                diffs = differences(self.recipe, ref.recipe)
                if not diffs:
                    self.fits.add(table)
                # fewest differences; on a tie, a command with ToE on/off as in the run
                toe_differs = (ref.recipe.get("toe_r1") is None) != (self.recipe.get("toe_r1") is None)
                score = len(diffs) + 0.5 * toe_differs
                if best is None or score < best[0]:
                    best = (score, ref, diffs)
        if self.mixed:
            self.fits.clear()  # a mixture of two trainings is no row of the paper
        if not self.fits and best is not None:
            _, self.closest, self.diffs = best

    def metrics(self, metric: str, use_flops: bool) -> Dict[str, Any]:
        key = (metric, use_flops)
        if key not in self._metrics:
            m = summarize_run(self.path, self.rows, self.args, metric, use_flops)
            if use_flops and m["gflops_note"] and m["gflops_note"] not in WARNED:
                WARNED.add(m["gflops_note"])
                warn(f"GFLOPs of {shown_path(self.path)} (and its likes) from log.txt: {m['gflops_note']}")
            self._metrics[key] = m
        return self._metrics[key]


def load_runs(paths: Sequence[str]) -> List[Run]:
    """All readable runs under ``paths``, placed in the tables they fit; a run folder without epoch rows or
    args is skipped with a warning."""
    runs: List[Run] = []
    for d in find_runs(paths):
        rows = runlog.epoch_rows(os.path.join(d, "log.txt"))
        if not rows:
            warn(f"skipping {d}: log.txt has no epoch yet")
            continue
        args = load_args(d)
        if args is None:
            warn(f"skipping {d}: no args.json and no readable checkpoint.pth with saved args")
            continue
        notices = [r for r in runlog.read_rows(os.path.join(d, "log.txt")) if runlog.is_notice(r)]
        runs.append(Run(d, rows, args, notices))
    if not runs:
        raise InputError(f"no readable run (log.txt with epochs + args) under {', '.join(paths)}")
    for run in runs:
        run.place(paper_results.TABLES)
    return runs


def left_out_lines(runs: List[Run], limit: int = 12) -> List[str]:
    """The output's first lines: the runs that fit no table, grouped by how they differ from the closest
    command of a table script, then one line per difference; [] when every run fits."""
    out = [r for r in runs if not r.fits]
    if not out:
        return []
    groups: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    for run in out:
        if run.closest is None:
            reasons = tuple(f"mixed: {change}" for change in run.mixed)
            groups.setdefault(("no table script could be read", reasons), []).append(shown_path(run.path))
            continue
        table = run.closest.table
        where = f"closest: Table {table}, {paper_results.TABLES[table]['script']}"
        reasons = [f"mixed: {change}" for change in run.mixed]
        reasons += [f"{flag_name(k)} {show_value(have)}, not {show_value(want)}" for k, have, want in run.diffs[:limit]]
        if len(run.diffs) > limit:
            rest = ", ".join(flag_name(k) for k, _, _ in run.diffs[limit:])
            reasons.append(f"and {len(run.diffs) - limit} more: {rest}")
        groups.setdefault((where, tuple(reasons)), []).append(shown_path(run.path))
    lines = [f"{len(out)} run(s) fit no paper table (they are in \"{YOURS}\" below); how they differ from the "
             "table scripts' commands:"]
    for (where, reasons), paths in groups.items():
        lines.append(f"  {shown_paths(paths)} ({where}):")
        lines += [f"    {reason}" for reason in reasons]
    return lines


