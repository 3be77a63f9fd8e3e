"""This run's GFLOPs per training iteration, from toe.flops (the only place the formula lives): the value
log.txt's ``gflops_per_iter`` holds for each epoch, and the start-up line with their mean over the run.

With a curriculum (``--curriculum`` / ``--curriculum-table``) an epoch costs the count of its (input size, ToE
stage) pair, as toe.flops' curriculum segments count it; the start-up mean is the mean of the epochs' values,
which is what scripts/summarize.py averages from log.txt for such a run.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

# {input size: {'per_stage': {stage: GFLOPs}, 'baseline': GFLOPs of the full tokens, when counted}}
Table = Dict[int, Dict[str, Any]]


def _size(cfg: Any, epoch: int) -> int:
    return cfg.model.input_size if cfg.curriculum is None else cfg.curriculum.input_size(epoch)


def _stage(cfg: Any, epoch: int) -> Optional[int]:
    return cfg.toe.schedule.stage(epoch) if cfg.toe is not None else None


def gflops_table(model: Any, cfg: Any) -> Tuple[Table, str]:
    """toe.flops' GFLOPs per iteration (forward MACs x 3 x global batch) at each (training size, ToE stage)
    the run trains, and the start-up line naming their mean over the run's epochs. ({}, a warning line) for a
    model toe.flops cannot count."""
    from toe import flops

    schedule = cfg.toe.schedule if cfg.toe is not None else None
    layer = cfg.toe.layer if cfg.toe is not None else 1
    batch, final = cfg.run.global_batch, cfg.model.input_size
    try:
        if cfg.curriculum is None:
            res = flops.gflops_per_iteration(model, schedule, layer=layer, batch_size=batch, img_size=final)
            table = {final: {"per_stage": {int(s["stage"]): float(s["gflops"]) for s in res["stages"]},
                             "baseline": float(res["baseline"]["gflops"])}}
        else:
            res = flops.gflops_per_iteration(model, schedule, layer=layer, batch_size=batch, img_size=final,
                                             curriculum=cfg.curriculum, epochs=cfg.run.epochs)
            table = _curriculum_table(res)
    except (ValueError, RuntimeError, TypeError) as e:
        return {}, f"warning: GFLOPs not counted for {cfg.model.name}: {e}"
    return table, startup_line(table, cfg, float(res["baseline"]["gflops"]))


def _curriculum_table(res: Dict[str, Any]) -> Table:
    table: Table = {}
    for seg in res["segments"]:
        entry = table.setdefault(int(seg["input_size"]), {"per_stage": {}})
        if seg["stage"] is None:
            entry["baseline"] = float(seg["gflops"])  # no ToE: the full tokens at the phase size
        else:
            entry["per_stage"][int(seg["stage"])] = float(seg["gflops"])
    size = int(res["img_size"][0])
    table.setdefault(size, {"per_stage": {}})["baseline"] = float(res["baseline"]["gflops"])
    return table


def at_epoch(table: Table, cfg: Any, epoch: int) -> Optional[float]:
    """log.txt's ``gflops_per_iter`` of ``epoch``: the count of its input size and ToE stage (None uncounted)."""
    entry = table.get(_size(cfg, epoch), {})
    return entry.get("per_stage", {}).get(_stage(cfg, epoch), entry.get("baseline"))


def run_mean(table: Table, cfg: Any) -> Optional[float]:
    """The mean of :func:`at_epoch` over the run's epochs, as the mean of log.txt's column comes out."""
    values = [at_epoch(table, cfg, e) for e in range(cfg.run.epochs)]
    return None if not values or None in values else sum(values) / len(values)


def _steps(table: Table, cfg: Any) -> List[str]:
    """'16 px stage 1: 0.05' per distinct (size, stage) in training order (the size only with a curriculum)."""
    out: List[str] = []
    for epoch in range(cfg.run.epochs):
        where = f"{_size(cfg, epoch)} px " if cfg.curriculum is not None else ""
        stage = _stage(cfg, epoch)
        text = f"{where}{'stage ' + str(stage) if stage is not None else 'full tokens'}: " \
               f"{at_epoch(table, cfg, epoch):.4g}"
        if not out or out[-1] != text:
            out.append(text)
    return out


def startup_line(table: Table, cfg: Any, baseline: float) -> str:
    """The run's mean GFLOPs per iteration as log.txt will average it, its steps, and the baseline."""
    if cfg.toe is None and cfg.curriculum is None:
        return (f"GFLOPs per iteration at global batch {cfg.run.global_batch}: {baseline:.4g} every epoch (all "
                f"tokens at {cfg.model.input_size} px)")
    mean = run_mean(table, cfg)
    what = "curriculum phase size and ToE stage" if cfg.curriculum is not None else "ToE stage"
    return (f"GFLOPs per iteration at global batch {cfg.run.global_batch}: mean {mean:.4g} over the run's "
            f"{cfg.run.epochs} epochs (log.txt's gflops_per_iter averaged; by {what}: "
            f"{', '.join(_steps(table, cfg))}); baseline {baseline:.4g} (all tokens at {cfg.model.input_size} px, "
            f"speed-up {baseline / mean:.2f}x)")
