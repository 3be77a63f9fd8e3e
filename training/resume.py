"""What a resume may change: the flags whose change stops a resume (unless --resume-changed-ok), the flags that
shape the weights, and the flags that may change with a notice; and the resume check itself (ResumeCheck), which
applies them to a checkpoint and loads its weights and training state."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from runtime import checkpoint
from runtime.errors import CheckpointError, UsageError


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


def change_text(flag: str, values: Any) -> str:
    """'--toe-r1 0.5 -> 0.6' for a changed flag [old, new]."""
    old, new = values

    def shown(v: Any) -> str:
        return v if isinstance(v, str) else repr(v)
    return f"--{flag.replace('_', '-')} {shown(old)} -> {shown(new)}"


def read_resume(path: str, eval_only: bool) -> Optional[Dict[str, Any]]:
    """The --resume checkpoint (None without one); training from it needs its 'model' entry."""
    if not path:
        return None
    ckpt = checkpoint.read(path)
    if "model" not in ckpt and not eval_only:
        raise CheckpointError(f"cannot resume from {path}: it has no 'model' entry (use --finetune for bare weights)")
    return ckpt


class ResumeCheck:
    """Continuing the run of checkpoint ``ckpt`` (read from ``path``) under this run's ``flags``: the changed-flag
    check, the weights, and the optimizer / scheduler / scaler / RNG state."""

    def __init__(self, ckpt: Dict[str, Any], path: str, flags: Dict[str, Any], changed_ok: bool,
                 model_name: str) -> None:
        self.ckpt, self.path, self.flags = ckpt, path, flags
        self.changed_ok, self.model_name = changed_ok, model_name
        self.saved_flags = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        self.lines: List[str] = []  # start-up lines, printed once every check has passed

    def check_changes(self) -> Dict[str, Any]:
        """Refuse a resume under another model or ToE setting; note allowed changes (epochs, lr, batch).
        Returns every change, {flag: [old, new]}."""
        blocking, noted = changes_since(self.saved_flags, self.flags)
        text = "; ".join(change_text(k, v) for k, v in {**blocking, **noted}.items())
        if blocking and not self.changed_ok:
            raise UsageError(f"{self.path} was trained with other settings: {text}; resume with "
                             f"--resume-changed-ok to continue anyway, or use another --output_dir")
        if blocking or noted:
            self.lines.append(f"notice: resuming with changed settings: {text}")
        return {**blocking, **noted}

    def load_weights(self, model: Any, model_ema: Optional[Any]) -> None:
        """The checkpoint's weights into ``model`` and its EMA (a fresh copy of the model where none was saved)."""
        try:
            model.load_state_dict(checkpoint.model_weights(self.ckpt), strict=True)
            if model_ema is not None:
                if self.ckpt.get("model_ema") is not None:
                    model_ema.module.load_state_dict(self.ckpt["model_ema"], strict=True)
                else:
                    model_ema.set(model)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {self.path} does not fit model {self.model_name}: "
                                  f"{self._why_not_fitting(model) or str(e).splitlines()[0]}") from None

    def _why_not_fitting(self, model: Any) -> str:
        """The saved run's architecture flags that differ from this run's, else the first mismatched keys."""
        blocking, _ = changes_since(self.saved_flags, self.flags)
        changed = {k: v for k, v in blocking.items() if k in ARCHITECTURE_FLAGS}
        if changed:
            return "changed since the checkpoint's run: " + "; ".join(change_text(k, v) for k, v in changed.items())
        return checkpoint.describe_mismatch(checkpoint.model_weights(self.ckpt), model.state_dict())

    def load_training_state(self, optimizer: Any, lr_scheduler: Any, scaler: Optional[Any]
                            ) -> Optional[Tuple[int, float]]:
        """Optimizer, scheduler, scaler and RNG from the checkpoint; returns (start epoch, best top-1 so far),
        or None for a checkpoint without training state."""
        ckpt, resumed = self.ckpt, None
        if "optimizer" in ckpt and "epoch" in ckpt:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
                if ckpt.get("lr_scheduler") is not None:
                    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
                if scaler is not None and ckpt.get("scaler") is not None:
                    scaler.load_state_dict(ckpt["scaler"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {self.path} does not fit these options (optimizer/scheduler): "
                                      f"{e}") from None
            if "rng" in ckpt:
                checkpoint.restore_rng_state(ckpt["rng"])
            resumed = (int(ckpt["epoch"]) + 1, float(ckpt.get("max_accuracy", 0.0)))
        self.lines.append(f"resumed from {self.path} (last finished epoch {ckpt.get('epoch', '?')})")
        return resumed
