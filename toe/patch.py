"""Apply Token Expansion to a model at run time, and remove it cleanly.

ToE only changes the *input of one block*, so the patch is a forward pre-hook on block ``layer`` that
replaces the token sequence by the output of :func:`toe.ops.token_expansion`. Nothing of the model's code
is copied, and the patched model's state_dict is exactly the plain model's. Which blocks, how many prefix
tokens, and which per-token side inputs (rotary embeddings, position biases) follow the kept tokens is the
model family's business (:mod:`toe.families`); a model of no supported family is refused by :func:`apply`.

The hook is a small object held by the block, so ``copy.deepcopy`` (EMA copies) gives the copy its own
independent state, and gradient checkpointing, which calls the block module, cannot skip it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .families import Family, SideInputHook, resolve
from .families.timm_vit import TimmViT
from .families.base import MethodOverride
from .ops import check_options, token_expansion
from .schedule import Schedule


class ToEHook:
    """Forward pre-hook state: the schedule, the options, the current stage, and the last selection.

    Under torch.compile the hook runs inside the compiled graph, and dynamo guards on every attribute it
    reads there: ``rates`` (a tuple) and the options. Those change only when :meth:`set_epoch` enters a new
    stage, so training compiles at most one graph per stage. ``epoch`` is kept for the host side and is
    never read in the forward. ``last_index`` / ``last_assignment`` are written in the forward (under
    compile, dynamo replays the write after the graph; it adds two outputs, no guard, no graph break).
    """

    def __init__(self, schedule: Schedule, layer: int, num_prefix_tokens: int, distance: str, init: str,
                 expand: bool, merge: bool, sparse_eval: bool, compat: str = "none",
                 family: Optional[Family] = None) -> None:
        self.schedule = schedule
        self.family = family if family is not None else TimmViT()  # timm's layout, as before families
        self.layer = layer
        self.num_prefix_tokens = num_prefix_tokens
        self.distance = distance
        self.init = init
        self.expand = expand
        self.merge = merge
        self.sparse_eval = sparse_eval
        self.compat = compat
        self.epoch = 0
        self.stage = schedule.stage(0)
        self.rates: Tuple[float, ...] = tuple(schedule.rates(self.stage))
        self.last_index: Optional[torch.Tensor] = None
        self.last_assignment: Optional[torch.Tensor] = None

    def set_epoch(self, epoch: int) -> None:
        """Record ``epoch``; replace the stage-level state (``stage``, ``rates``) only when the stage changes."""
        stage = self.schedule.stage(epoch)  # validates
        self.epoch = int(epoch)
        if stage != self.stage:
            self.stage = stage
            self.rates = tuple(self.schedule.rates(stage))

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict):
        self.last_index = self.last_assignment = None
        # Mode first: the eval graph then reads no stage state and serves every stage.
        if not (block.training or self.sparse_eval):
            return None
        rates = self.rates
        if rates[-1] >= 1.0:
            return None
        tokens, index, assignment = token_expansion(
            self.family.read_hidden(args, kwargs), rates, self.schedule.k,
            num_prefix_tokens=self.num_prefix_tokens, distance=self.distance, init=self.init,
            expand=self.expand, merge=self.merge, return_assignment=True, compat=self.compat)
        self.last_index, self.last_assignment = index, assignment
        return self.family.write_hidden(args, kwargs, tokens)


def _is_wrapper(model: nn.Module) -> bool:
    """DDP / DataParallel, or any module whose only content is a child named ``module`` (same layout)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return True
    children = [name for name, _ in model.named_children()]
    return (children == ["module"] and not any(True for _ in model.parameters(recurse=False))
            and not any(True for _ in model.buffers(recurse=False)))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile (``._orig_mod``) and DDP (``.module``) wrappers, nested in any
    order; ``model`` itself when it is not wrapped."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and _is_wrapper(model):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _find_hook(model: nn.Module) -> Optional[ToEHook]:
    for module in unwrap_model(model).modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ToEHook):
                return hook
    return None


def _hook(model: nn.Module) -> ToEHook:
    hook = _find_hook(model)
    if hook is None:
        raise RuntimeError("ToE is not applied to this model; call toe.apply(model, schedule) first")
    return hook


def apply(model: nn.Module, schedule: Schedule, *, layer: int = 1, distance: str = "cosine",
          init: str = "spatial", expand: bool = True, merge: bool = True, sparse_eval: bool = False,
          compat: str = "none") -> nn.Module:
    """Patch ``model`` in place so that block ``layer`` receives the ToE-selected tokens; returns it.

    Args:
        model: a ViT of a supported family (:mod:`toe.families`), possibly wrapped by DDP or
            torch.compile; any other model raises ValueError naming its class and the supported families.
        schedule: the stage schedule (r0, r1, ng, k, epochs).
        layer: index of the block whose input is reduced; 1 (after the first block) is the paper's
            default, 0 is right after the embedding (Table 8).
        distance, init, expand, merge, compat: see :func:`toe.ops.token_expansion` (``compat="official"``
            selects tokens as the authors' released code does).
        sparse_eval: also reduce tokens in eval mode (by default evaluation uses every token).

    The hook starts at epoch 0 (stage 1); call :func:`set_epoch` every epoch.

    torch.compile: apply before the first compiled call. Dynamo does not guard on module hooks by default
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a hook added or removed after a model was traced,
    or a second compiled instance of the same class whose hooks differ (e.g. a compiled baseline next to a
    compiled ToE model), may run a graph traced without ToE. Set that flag to False in such processes.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a toe.Schedule, got {type(schedule).__name__}")
    check_options(distance=distance, init=init, compat=compat)
    target = unwrap_model(model)
    family = resolve(target)
    blocks = family.blocks(target)
    if not (0 <= layer < len(blocks)):
        raise ValueError(f"layer must be in [0, {len(blocks) - 1}] for a {len(blocks)}-block model, got {layer}")
    if _find_hook(target) is not None:
        raise RuntimeError("ToE is already applied to this model; call toe.remove(model) first")
    hook = ToEHook(schedule, layer, family.num_prefix_tokens(target), distance, init, expand, merge,
                   sparse_eval, compat, family)
    # Registered first on this block, so side-input hooks on the same block see this forward's selection.
    blocks[layer].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    family.attach_side_inputs(target, layer, hook)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Remove the ToE hook; the model behaves exactly as before :func:`apply`."""
    for module in unwrap_model(model).modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, (ToEHook, SideInputHook)):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        for key, value in list(vars(module).items()):
            if isinstance(value, MethodOverride):
                delattr(module, key)
    return model


def set_epoch(model: nn.Module, epoch: int) -> None:
    """Set the 0-based epoch that selects the stage; call it at the start of every epoch.

    Only a stage change touches what the forward reads, so a compiled model recompiles once per stage.
    """
    _hook(model).set_epoch(epoch)


def is_applied(model: nn.Module) -> bool:
    """Whether ``model`` carries a ToE hook."""
    return _find_hook(model) is not None


def current_rates(model: nn.Module) -> list:
    """Cumulative keep rates [r0, ..., r_delta] of the current epoch's stage."""
    return list(_hook(model).rates)


def last_index(model: nn.Module) -> Optional[torch.Tensor]:
    """Positions [B, P + n] of the tokens kept in the last forward, or None if ToE did not run."""
    return _hook(model).last_index


def last_assignment(model: nn.Module) -> Optional[torch.Tensor]:
    """For the last forward: [B, M] slot (prefix included) of the token carrying each patch position,
    -1 where the token was dropped; None if ToE did not run."""
    return _hook(model).last_assignment
