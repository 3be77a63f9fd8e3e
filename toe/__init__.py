"""Token Expansion (ToE, CVPR 2024): accelerate ViT training by growing the token set over stages.

    import toe
    schedule = toe.Schedule(r1=0.5, ng=3, k=2, epochs=300)
    toe.apply(model, schedule)          # patches block 1's input at run time
    for epoch in range(300):
        toe.set_epoch(model, epoch)
        ...

``toe.apply(..., compat="official")`` selects tokens as the authors' released code does (see ``toe.ops``);
``toe.unwrap_model`` strips DDP / torch.compile wrappers.

``toe.Schedule`` needs no torch; the op and the patch are imported on first use, so a training entry can
validate its ToE flags before paying for ``import torch``.
"""
from importlib import import_module
from typing import Any

from .schedule import Schedule

_LAZY = {"token_expansion": ".ops", "apply": ".patch", "remove": ".patch", "set_epoch": ".patch",
         "is_applied": ".patch", "current_rates": ".patch", "last_index": ".patch", "last_assignment": ".patch",
         "unwrap_model": ".patch"}

__all__ = ["Schedule", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'toe' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
