"""Common ground of the Hugging Face transformers (5.x) image encoders: a family names the transformers
package it covers, the classes it accepts (and where their encoder's layer list lives), and the classes it
refuses with the reason. Detection reads class names and module paths only, so ``import toe`` never
imports transformers.

Every such encoder calls its layers as ``layer(hidden_states, attention_mask, **kwargs)``. The mask, when
there is one, is sized to the full sequence, so a patched layer that receives one refuses it (a plain
forward of these image models passes None unless the caller gives ``attention_mask``); ``flex_attention``
always builds a full-length block mask and is refused by :func:`toe.apply`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from .base import Family


class HFVisionFamily(Family):
    """One transformers model package (``transformers.models.<package>``).

    ``accepted`` maps a class name to the attribute path (dotted, "" for the model itself) of the module
    that owns ``layers``; ``refused`` maps a class name to why ToE cannot patch it exactly.
    """

    hidden_keyword = "hidden_states"
    package: str = ""
    accepted: Dict[str, str] = {}
    refused: Dict[str, str] = {}
    layers: str = "layers"

    def _family_class(self, model: nn.Module) -> Optional[type]:
        """The first class in the model's MRO that this family names (a user subclass is judged by it)."""
        prefix = f"transformers.models.{self.package}."
        for cls in type(model).__mro__:
            if cls.__module__.startswith(prefix) and (cls.__name__ in self.accepted or cls.__name__ in self.refused):
                return cls
        return None

    def matches(self, model: nn.Module) -> bool:
        return self._family_class(model) is not None

    def refusal(self, model: nn.Module) -> Optional[str]:
        name = self._family_class(model).__name__
        if name in self.refused:
            return f"{self.refused[name]} (supported: {', '.join(self.accepted)})"
        for holder in (model, self._owner(model)):
            implementation = getattr(getattr(holder, "config", None), "_attn_implementation", None)
            if isinstance(implementation, str) and "flex" in implementation:
                return (f"attn_implementation={implementation!r} builds a block mask for the full sequence; "
                        f"use 'sdpa' or 'eager'")
        if not isinstance(_attribute(self._owner(model), self.layers), nn.ModuleList):
            return f"expected an nn.ModuleList at {self.layers!r}"
        return None

    def _owner(self, model: nn.Module) -> nn.Module:
        return _attribute(model, self.accepted[self._family_class(model).__name__])

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return _attribute(self._owner(model), self.layers)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def read_hidden(self, args: tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:
            raise ValueError(f"ToE ({self.name}): the patched layer received an attention mask "
                             f"({type(mask).__name__}) sized to the full sequence; ToE reduces the sequence, so it "
                             f"cannot keep it exact: call the model without attention_mask")
        return super().read_hidden(args, kwargs)


def _attribute(module: Any, path: str) -> Any:
    """``module.a.b`` for path "a.b"; ``module`` for ""; None where an attribute is missing."""
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
    return module
