"""What a resume may change: the flags whose change stops a resume (unless --resume-changed-ok), the flags that
shape the weights, and the flags that may change with a notice. Read by the resume check of the trainer."""
from __future__ import annotations

from typing import Any, Dict, Tuple


# ------------------------------------------------------------------------------------ resume changes
# flags whose change makes a resumed run a different experiment; it stops unless --resume-changed-ok
BLOCKING_CHANGES = ("model", "model_kwargs", "patch_size", "input_size", "toe_r1", "toe_ng", "toe_k", "toe_r0",
                    "toe_layer", "toe_distance", "toe_init", "toe_no_expand", "toe_no_merge", "toe_epochs",
                    "toe_stage_epochs", "toe_sparse_eval", "toe_compat", "curriculum", "curriculum_table",
                    "curriculum_downsample", "sched_on_updates")
# the flags that shape the weights: a checkpoint of another value of one of them cannot load
ARCHITECTURE_FLAGS = ("model", "model_kwargs", "patch_size", "input_size")
# flags that may change (a longer schedule, another batch), with a notice in the output and in log.txt
NOTED_CHANGES = ("epochs", "lr", "batch_size", "grad_accum_steps", "global_batch", "unscale_lr",
                 "curriculum_batch_scale", "train_cooldown", "data_backend")


def changes_since(saved: Dict[str, Any], current: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(blocking, noted) flag changes between a checkpoint's flags and this run's: {flag: [old, new]}.
    Flags the checkpoint did not record are not compared."""
    def diff(names):
        return {name: [saved[name], current.get(name)] for name in names
                if name in saved and saved[name] != current.get(name)}

    return diff(BLOCKING_CHANGES), diff(NOTED_CHANGES)
