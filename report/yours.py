"""The "Your runs" table: the runs that fit no paper table, each ToE run next to the baseline run with the
same arguments apart from the --toe-* flags."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from training import builders
from report.common import YOURS, flag_name, show_value, shown_path
from report.recipes import NOT_COMPARED
from report.runargs import global_batch
from report.runs import Run
from report.tables import Cell, cell_json, gflops_text, hours_text, ratio_text, top1_text

# =========================================================================================== your runs
# Arguments that differ between otherwise equal runs without changing what they train: how a run was launched,
# loaded, resumed or restarted (the flags not compared with the paper's commands, but for where the data lies
# and the seed, which tell runs apart), and what the launcher filled in for each process. They neither split a
# ToE run from its baseline nor appear in the Setup column.
HOW_IT_RUNS = NOT_COMPARED - {"data_path", "token_label_data", "seed"}
_PAIR_IGNORED = HOW_IT_RUNS | {"start_epoch", "rank", "gpu", "distributed", "dist_backend"}


def pair_key(args: Dict[str, Any]) -> str:
    """A run's arguments apart from the --toe-* flags and ``_PAIR_IGNORED``: a ToE run and its baseline share
    it."""
    kept = {k: v for k, v in args.items() if not k.startswith("toe_") and k not in _PAIR_IGNORED}
    return json.dumps(kept, sort_keys=True, default=str)


# Always in the Setup column (with model, data, size, epochs and batch): what changes training most often.
_SETUP_ALWAYS = ("aa", "clip_grad")
# Shown in the Setup column's fixed part, or following from flags shown there.
_SETUP_SHOWN = frozenset({"model", "model_kwargs", "patch_size", "data_set", "input_size", "epochs", "aa",
                          "clip_grad", "curriculum", "curriculum_table", "global_batch", "lr_scaled"})


def setup_differences(runs: List[Run]) -> List[str]:
    """The flags (apart from --toe-*) whose values differ between the given runs, in a stable order: the Setup
    column shows them, so that two rows that look alike are alike."""
    kept = [json.loads(pair_key(r.args)) for r in runs]
    keys = sorted({k for one in kept for k in one} - _SETUP_SHOWN)
    return [k for k in keys if len({json.dumps(one.get(k), sort_keys=True) for one in kept}) > 1]


def setup_text(args: Dict[str, Any], differing: Sequence[str] = ()) -> str:
    """Model, data set, input size, epochs, global batch (and model kwargs), the curriculum, --aa, --clip-grad
    and the ``differing`` flags, in a few words."""
    kw = builders.model_kwargs(args.get("model_kwargs"), args.get("patch_size"))
    extra = f" {show_value(kw)}" if kw else ""
    text = (f"{args.get('model')}{extra}, {args.get('data_set')} {args.get('input_size')}px, "
            f"{args.get('epochs')} ep, batch {global_batch(args)}")
    if args.get("curriculum_table"):
        text += f", --curriculum-table {args['curriculum_table']}"
    else:
        text += f", --curriculum {show_value(args.get('curriculum') or 'none')}"
    for key in list(_SETUP_ALWAYS) + list(differing):
        text += f", {flag_name(key)} {show_value(args.get(key))}"
    return text


def method_text(run: Run) -> str:
    """Baseline or the ToE setting (what differs from the paper's defaults included: distance, init,
    --toe-compat, the token-labeling loss, stage epochs, sparse evaluation, ablations), and how the run was
    mixed by resumes with changed flags."""
    cfg, args = run.config, run.args
    if not cfg["toe"]:
        text = "baseline"
    else:
        text = (f"ToE r1={cfg['r1']:g} r0={cfg['r1'] * cfg['r0_ratio']:g} ng={cfg['ng']} k={cfg['k']} "
                f"layer={cfg['layer']}")
        for key, default in (("distance", "cosine"), ("init", "spatial"), ("compat", "none")):
            if cfg[key] != default:
                text += f" {key}={cfg[key]}"
        if args.get("token_label"):
            text += f" dense-loss={args.get('toe_dense_loss') or 'merged'}"
        if args.get("toe_stage_epochs"):
            text += f" stages={show_value(args['toe_stage_epochs']).replace(' ', '/')}"
        elif args.get("toe_epochs") and args.get("toe_epochs") != args.get("epochs"):
            text += f" toe-epochs={args['toe_epochs']}"
        text += " sparse-eval" if args.get("toe_sparse_eval") else ""
        text += "" if cfg["expand"] else " no-expand"
        text += "" if cfg["merge"] else " no-merge"
    return text + (f" (mixed: {'; '.join(run.mixed)})" if run.mixed else "")


def your_groups(runs: List[Run]) -> List[Tuple[List[Run], List[Run]]]:
    """The runs that fit no paper table, as (baselines, ToE runs) sharing a :func:`pair_key`, in path order."""
    groups: Dict[str, Tuple[List[Run], List[Run]]] = {}
    for run in sorted((r for r in runs if not r.fits), key=lambda r: r.path):
        base, toes = groups.setdefault(pair_key(run.args), ([], []))
        (toes if run.config["toe"] else base).append(run)
    return [(b, sorted(t, key=lambda r: (r.config["r1"], r.path))) for b, t in groups.values()]


def build_yours(runs: List[Run], use_flops: bool) -> Optional[Dict[str, Any]]:
    """The "Your runs" table (None when every run fits a paper table): each ToE run after the baseline runs
    whose arguments equal its own apart from --toe-* and the output folder; best and final top-1 with their
    difference to the baseline, GFLOPs/iter and the theoretical speed-up, GPU hours and the practical one."""
    groups = your_groups(runs)
    if not groups:
        return None
    header = ["Run", "Setup", "Method", "Top-1 best", "Top-1 final", "GFLOPs/iter", "Speed-up (GFLOPs)",
              "GPU hours", "Speed-up (hours)"]
    out, cells = [], {}
    unpaired = 0
    differing = setup_differences([r for b, ts in groups for r in b + ts])
    for bases, toes in groups:
        base = Cell(bases, "test_acc1", use_flops)
        for run in bases + toes:
            cell = Cell([run], "test_acc1", use_flops)
            ref = base if run in toes and not base.empty else None
            unpaired += run in toes and ref is None
            out.append([shown_path(run.path), setup_text(run.args, differing), method_text(run),
                        top1_text(cell, ref), top1_text(cell, ref, value="final_top1"), gflops_text(cell),
                        ratio_text(ref.gflops, cell.gflops) if ref else "–", hours_text(cell.gpu_hours),
                        ratio_text(ref.gpu_hours, cell.gpu_hours) if ref else "–"])
            cells[shown_path(run.path)] = {**cell_json(cell), "baseline": [r.path for r in bases] if ref else [],
                                           "mixed": run.mixed}
    notes = ["each ToE run follows the baseline run(s) with the same arguments apart from --toe-* and the output "
             "folder; (+x.xx): difference to the baseline (mean of several); speed-ups = baseline / run",
             "top-1: the model's own (not EMA), best over the logged epochs and at the last one; GPU hours: sum of "
             "epoch training time x processes"]
    if any(r.mixed for b, ts in groups for r in b + ts):
        notes.append("mixed: resumed with changed flags (log.txt's resumed_with_changes row), so part of the run "
                     "trained otherwise; such runs never fill a paper table")
    if unpaired:
        notes.append(f"{unpaired} ToE run(s) without a baseline of the same arguments: nothing to compare with")
    if any("[log]" in c for r in out for c in r):
        notes.append("[log]: GFLOPs logged by main.py (toe.flops could not count the run, or --no-flops)")
    if any("*" in r[3] for r in out):
        notes.append("* run not finished: fewer epochs logged than --epochs")
    return {"table": "yours", "title": f"{YOURS} (they fit no paper table)", "header": header, "rows": out,
            "notes": notes, "cells": cells}


