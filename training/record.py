"""The run record: args.json, one log.txt row per epoch, TensorBoard scalars and the checkpoints, written by
rank 0 into --output_dir. The log row is appended first and the checkpoint written second (both atomically):
a kill between the two re-runs that epoch on resume, which truncates the log to the resumed epoch, so every
epoch is logged once."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from runtime import checkpoint, runlog
from runtime.errors import EXIT_NONFINITE, fail


class RunRecord:
    """What one run leaves in ``output_dir`` ('' = nothing); ranks other than the main one write nothing."""

    def __init__(self, output_dir: str, is_main: bool, flags: Dict[str, Any]) -> None:
        self.output_dir, self.flags = output_dir, flags
        self.log_path = os.path.join(output_dir, "log.txt") if output_dir else ""
        self.ckpt_path = os.path.join(output_dir, "checkpoint.pth") if output_dir else ""
        self.writes = bool(output_dir) and is_main
        self.writer = None

    def open(self, start_epoch: int, saved_row: Optional[Dict[str, Any]], changes: Dict[str, Any]) -> None:
        """args.json, log.txt cut back to ``start_epoch`` (with the checkpoint's own row if a crash lost it, and a
        row of the ``changes`` a resume made), and the TensorBoard writer."""
        if not self.writes:
            return
        from runtime.files import atomic_write_text

        out = self.output_dir
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "args.json"), json.dumps(self.flags, indent=1, sort_keys=True) + "\n")
        runlog.truncate(self.log_path, start_epoch)
        if isinstance(saved_row, dict) and not any(r.get("epoch") == saved_row.get("epoch")
                                                   for r in runlog.epoch_rows(self.log_path)):
            runlog.append(self.log_path, saved_row)  # the checkpoint's epoch line was lost in a crash
        if changes:
            runlog.append(self.log_path, {"resumed_with_changes": changes, "epoch": start_epoch})
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(out, "tb"), purge_step=start_epoch)

    def write(self, epoch: int, row: Dict[str, Any], state: Dict[str, Any], is_best: bool) -> None:
        """The epoch's log row, then its checkpoint ``state`` (and best_checkpoint.pth), then its scalars."""
        runlog.append(self.log_path, row)  # the log line first, then the checkpoint (see module docstring)
        checkpoint.save(self.ckpt_path, state)
        if is_best:
            checkpoint.save(os.path.join(self.output_dir, "best_checkpoint.pth"), state)
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(board_tag(key), value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def non_finite(self, error: Any) -> int:
        """The one line of a NaN/inf loss (engine.NonFiniteLossError): where, and the checkpoint to resume from."""
        if self.ckpt_path and os.path.isfile(self.ckpt_path):
            where = (f"resume from {self.ckpt_path} (last completed epoch {checkpoint.epoch_of(self.ckpt_path)}) "
                     f"with --resume {self.ckpt_path}")
        else:
            where = "no checkpoint was written yet (restart from scratch)"
        return fail(f"non-finite loss ({error.value}) at epoch {error.epoch}, iteration {error.iteration}/"
                    f"{error.total}; {where}, e.g. with a lower --lr or --clip-grad", EXIT_NONFINITE)


def epoch_row(epoch: int, stats: Dict[str, Any], evaluation: Dict[str, Any], *, schedule: Optional[Any],
              size: int, tokens: int, num_patches: int, gflops: Optional[float], max_accuracy: float,
              n_parameters: int, skipped_images: int, curriculum_fields: Dict[str, Any]) -> Dict[str, Any]:
    """log.txt's row of ``epoch``: the training ``stats`` and ``evaluation`` of engine, ToE's stage (``schedule``
    None without ToE), the measured ``tokens``, the training ``size``, the epoch's GFLOPs per iteration (None where uncounted),
    the curriculum's fields."""
    stage = schedule.stage(epoch) if schedule is not None else None
    row: Dict[str, Any] = {
        "train_loss": stats["loss"], "train_lr": stats["lr"], "toe_stage": stage,
        "toe_keep_rate": schedule.keep_rate(epoch) if schedule is not None else 1.0,
        "toe_tokens": tokens, "num_patches": num_patches, "train_input_size": size,
        "epoch_time": stats["epoch_time"], "train_img_per_s": stats["img_per_s"], **evaluation,
        "max_accuracy": max_accuracy, "n_parameters": n_parameters,
        "gflops_per_iter": gflops,
        "epoch": epoch, "skipped_images": skipped_images,
    }
    row.update(curriculum_fields)
    return row


def board_tag(key: str) -> str:
    """log.txt key -> TensorBoard tag grouped by its prefix (train/, test/, ema/, toe/)."""
    for prefix in ("train", "test", "ema", "toe"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return "misc/" + key
