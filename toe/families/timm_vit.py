"""timm's ``VisionTransformer`` (DeiT, distilled, register and no-class-token variants) and models built
the same way, such as this repository's LV-ViT: ``model.blocks`` called as ``block(x)`` with the full token
sequence, ``model.num_prefix_tokens`` prefix tokens first."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import Family, has_int


class TimmViT(Family):
    name = "timm-vit"
    description = "timm VisionTransformer and look-alikes (model.blocks + model.num_prefix_tokens), LV-ViT"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)) and has_int(
            model, "num_prefix_tokens")

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)
