"""Apply Token Expansion to a model at run time, and remove it cleanly.

ToE only changes the *input of one block*, so the patch is a forward pre-hook on ``model.blocks[layer]``
that replaces the token sequence by the output of :func:`toe.ops.token_expansion`. Nothing of timm's
model code is copied, and the patched model's state_dict is exactly the plain model's. Any model with
a ``blocks`` sequence and a ``num_prefix_tokens`` attribute works (timm ViTs, DeiT distilled, register
and no-CLS variants, this repository's LV-ViT).

The hook is a small object held by the block, so ``copy.deepcopy`` (EMA copies) gives the copy its own
independent state, and gradient checkpointing, which calls the block module, cannot skip it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops import DISTANCES, INITS, token_expansion
from .schedule import Schedule


class ToEHook:
    """Forward pre-hook state: the schedule, the current epoch, the options, and the last selection."""

    def __init__(self, schedule: Schedule, layer: int, num_prefix_tokens: int, distance: str, init: str,
                 expand: bool, merge: bool, sparse_eval: bool) -> None:
        self.schedule = schedule
        self.layer = layer
        self.num_prefix_tokens = num_prefix_tokens
        self.distance = distance
        self.init = init
        self.expand = expand
        self.merge = merge
        self.sparse_eval = sparse_eval
        self.epoch = 0
        self.last_index: Optional[torch.Tensor] = None
        self.last_assignment: Optional[torch.Tensor] = None

    @property
    def rates(self):
        """Cumulative keep rates [r0, ..., r_delta] of the current epoch's stage."""
        return self.schedule.rates(self.schedule.stage(self.epoch))

    def __call__(self, block: nn.Module, args: tuple):
        self.last_index = self.last_assignment = None
        rates = self.rates
        if rates[-1] >= 1.0 or not (block.training or self.sparse_eval):
            return None
        tokens, index, assignment = token_expansion(
            args[0], rates, self.schedule.k, num_prefix_tokens=self.num_prefix_tokens, distance=self.distance,
            init=self.init, expand=self.expand, merge=self.merge, return_assignment=True)
        self.last_index, self.last_assignment = index, assignment
        return (tokens,) + tuple(args[1:])


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that owns ``blocks`` under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "blocks"):
            model = model.module
        else:
            return model


def _find_hook(model: nn.Module) -> Optional[ToEHook]:
    model = unwrap_model(model)
    for block in getattr(model, "blocks", ()):
        for hook in block._forward_pre_hooks.values():
            if isinstance(hook, ToEHook):
                return hook
    return None


def _hook(model: nn.Module) -> ToEHook:
    hook = _find_hook(model)
    if hook is None:
        raise RuntimeError("ToE is not applied to this model; call toe.apply(model, schedule) first")
    return hook


def apply(model: nn.Module, schedule: Schedule, *, layer: int = 1, distance: str = "cosine",
          init: str = "spatial", expand: bool = True, merge: bool = True, sparse_eval: bool = False) -> nn.Module:
    """Patch ``model`` in place so that block ``layer`` receives the ToE-selected tokens; returns it.

    Args:
        model: a model with ``blocks`` (sequence of blocks) and ``num_prefix_tokens``.
        schedule: the stage schedule (r0, r1, ng, k, epochs).
        layer: index of the block whose input is reduced; 1 (after the first block) is the paper's
            default, 0 is right after the embedding (Table 8).
        distance, init, expand, merge: see :func:`toe.ops.token_expansion`.
        sparse_eval: also reduce tokens in eval mode (by default evaluation uses every token).
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a toe.Schedule, got {type(schedule).__name__}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    target = unwrap_model(model)
    blocks = getattr(target, "blocks", None)
    prefix = getattr(target, "num_prefix_tokens", None)
    if blocks is None or prefix is None:
        raise ValueError(f"{type(target).__name__} has no `blocks` and `num_prefix_tokens`; ToE cannot patch it")
    if not (0 <= layer < len(blocks)):
        raise ValueError(f"layer must be in [0, {len(blocks) - 1}] for a {len(blocks)}-block model, got {layer}")
    if _find_hook(target) is not None:
        raise RuntimeError("ToE is already applied to this model; call toe.remove(model) first")
    hook = ToEHook(schedule, layer, int(prefix), distance, init, expand, merge, sparse_eval)
    blocks[layer].register_forward_pre_hook(hook)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Remove the ToE hook; the model behaves exactly as before :func:`apply`."""
    target = unwrap_model(model)
    for block in getattr(target, "blocks", ()):
        for key, hook in list(block._forward_pre_hooks.items()):
            if isinstance(hook, ToEHook):
                del block._forward_pre_hooks[key]
    return model


def set_epoch(model: nn.Module, epoch: int) -> None:
    """Set the 0-based epoch that selects the stage; call it at the start of every epoch."""
    hook = _hook(model)
    hook.schedule.stage(epoch)  # validates
    hook.epoch = int(epoch)


def is_applied(model: nn.Module) -> bool:
    """Whether ``model`` carries a ToE hook."""
    return _find_hook(model) is not None


def current_rates(model: nn.Module):
    """Cumulative keep rates [r0, ..., r_delta] of the current epoch's stage."""
    return list(_hook(model).rates)


def last_index(model: nn.Module) -> Optional[torch.Tensor]:
    """Positions [B, P + n] of the tokens kept in the last forward, or None if ToE did not run."""
    return _hook(model).last_index


def last_assignment(model: nn.Module) -> Optional[torch.Tensor]:
    """For the last forward: [B, M] slot (prefix included) of the token carrying each patch position,
    -1 where the token was dropped; None if ToE did not run."""
    return _hook(model).last_assignment
