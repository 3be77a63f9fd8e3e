"""Training checkpoints: everything needed to continue a run bitwise after a finished epoch, written
atomically, and read back under ``torch.load(weights_only=True)`` (no code runs on load)."""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from runtime import distributed
from runtime.errors import CheckpointError
from runtime.files import atomic_write


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`; CUDA states are restored only on the same number of devices."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def read(path: str) -> Dict[str, Any]:
    """Load a checkpoint dict on CPU; any failure is one CheckpointError line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and unsafe-global errors all mean: not a usable checkpoint
        text = str(e).strip()
        reason = text.splitlines()[0][:200] if text else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (not a torch.save file, truncated, or holding "
                              f"objects other than tensors and plain data): {reason}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def model_weights(ckpt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model state of a training checkpoint, or the checkpoint itself when it is a bare state_dict."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def epoch_of(path: str) -> Any:
    """The last finished epoch recorded in ``path``, or '?' when it cannot be read."""
    try:
        return read(path).get("epoch", "?")
    except CheckpointError:
        return "?"


def save(path: str, state: Dict[str, Any]) -> None:
    """Write ``state`` atomically from rank 0 (other ranks return at once)."""
    if distributed.is_main_process():
        atomic_write(path, lambda f: torch.save(state, f))


def training_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                   scaler: Optional[Any], model_ema: Optional[Any], epoch: int, config: Dict[str, Any],
                   max_accuracy: float, **extra: Any) -> Dict[str, Any]:
    """The dict :func:`save` writes after ``epoch``: weights, optimizer, scheduler, scaler, EMA, RNG, config."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "epoch": int(epoch),
        "max_accuracy": float(max_accuracy),
        "rng": rng_state(),
        "args": config,
        **extra,
    }


def describe_mismatch(state: Dict[str, Any], target: Dict[str, Any]) -> str:
    """Why ``state`` does not load into a model whose state_dict is ``target``: the first missing and
    unexpected keys and the first shape difference, e.g. 'shape of pos_embed: (1, 65, 64) in the file,
    (1, 197, 64) in the model'; '' when they fit."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and hasattr(state[k], "shape") and
             tuple(state[k].shape) != tuple(target[k].shape)]
    parts = []
    if wrong:
        parts.append(f"shape of {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, "
                     f"{tuple(target[wrong[0]].shape)} in the model" + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1
                                                                        else ""))
    if missing:
        parts.append(f"{len(missing)} keys missing from the file (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys not in the model (first: {', '.join(unexpected[:3])})")
    return "; ".join(parts)
