"""How thop is made to count what the paper counted (used by :mod:`toe.flops`, which holds the formula).

* thop calls ``model.eval()`` before counting, and ToE only runs in training: :class:`_KeepMode` keeps the
  wrapped model in its own mode.
* thop looks rules up by *exact* module type: leaf modules whose class derives from a thop-registered class
  (timm's ``LayerNorm``) get that class's rule, and ``nn.MultiheadAttention`` (torchvision's ViT) gets a rule
  for its four projections.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


def _thop():
    """Import thop quietly (it imports distutils' deprecated LooseVersion at import time)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import thop
    # `thop.profile` the attribute is the function; the module holding the rule table is in sys.modules.
    return thop, sys.modules["thop.profile"].register_hooks


class _KeepMode(nn.Module):
    """Container for thop: ``thop.profile`` calls ``.eval()`` (and later ``.train(prev)``) on what it
    profiles; this wrapper ignores both, so the wrapped model is counted in its own mode (ToE runs only
    while training)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "_KeepMode":
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)


def _multihead_attention_rule(module: nn.MultiheadAttention, inputs: tuple, output: Any) -> None:
    """MACs of ``nn.MultiheadAttention``'s four projections (torchvision's ViT): what thop counts for timm's
    ``qkv`` and ``proj`` Linear layers. thop has no rule for the module, and its in-projection is a functional
    call, so without this the q, k, v projections would count zero. Attention products count zero, as for timm."""
    query, key, value = inputs[:3]
    width = module.embed_dim
    tokens = query.numel() // query.shape[-1]
    keys, values = key.numel() // key.shape[-1], value.numel() // value.shape[-1]
    macs = tokens * width * width * 2 + keys * module.kdim * width + values * module.vdim * width
    module.total_ops += torch.DoubleTensor([float(macs)])


def _subclass_rules(model: nn.Module, register_hooks: Dict[type, Any]) -> Dict[type, Any]:
    """thop rules for leaf module classes that derive from a class thop knows (e.g. timm's LayerNorm), and for
    ``nn.MultiheadAttention`` (its out-projection child is counted by this rule, not separately)."""
    rules: Dict[type, Any] = {nn.MultiheadAttention: _multihead_attention_rule}
    for module in model.modules():
        cls = type(module)
        if cls in register_hooks or cls in rules or next(module.children(), None) is not None:
            continue
        for base, rule in register_hooks.items():
            if base is not nn.Sequential and isinstance(module, base):
                rules[cls] = rule
                break
    return rules


def profile(model: nn.Module, x: torch.Tensor, token_block: Optional[nn.Module] = None
             ) -> Tuple[float, Optional[int], Optional[int]]:
    """thop MACs of ``model(x)`` in the model's current mode, plus the token counts of ``token_block``:
    what reached it (before any forward pre-hook, such as ToE's) and what it really processed.
    ``model`` must be a private copy: thop adds (and removes) buffers and hooks on it."""
    thop, register_hooks = _thop()
    entering: List[int] = []
    processed: List[int] = []

    def record_input(block: nn.Module, args: tuple) -> None:
        if args and torch.is_tensor(args[0]) and args[0].dim() == 3:
            entering.append(int(args[0].shape[1]))

    def record_output(block: nn.Module, args: tuple, output: Any) -> None:
        # A block's output has as many tokens as the input it really ran on (after ToE's pre-hook).
        out = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(out) and out.dim() == 3:
            processed.append(int(out.shape[1]))

    handles = []
    if token_block is not None:
        # prepend: seen before ToE's own pre-hook replaces the tokens
        handles.append(token_block.register_forward_pre_hook(record_input, prepend=True))
        handles.append(token_block.register_forward_hook(record_output))
    try:
        sink = io.StringIO()
        with torch.no_grad(), contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            macs, _ = thop.profile(_KeepMode(model), inputs=(x,), custom_ops=_subclass_rules(model, register_hooks),
                                   verbose=False)
    finally:
        for handle in handles:
            handle.remove()
    return float(macs), (entering[0] if entering else None), (processed[0] if processed else None)
