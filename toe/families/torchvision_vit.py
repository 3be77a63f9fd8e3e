"""torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_l_16``, ... and custom sizes): the blocks are
``model.encoder.layers`` (an ``nn.Sequential`` of ``EncoderBlock``, each called as ``block(input)``), one
class token first. The encoder adds ``pos_embedding`` and dropout before its first block, so the patch
sees position-embedded tokens exactly as timm's blocks do; the head reads token 0, which ToE keeps."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import Family


class TorchvisionViT(Family):
    name = "torchvision-vit"
    description = "torchvision VisionTransformer (model.encoder.layers, 1 class token)"
    hidden_keyword = "input"  # EncoderBlock.forward(input)

    def matches(self, model: nn.Module) -> bool:
        encoder = getattr(model, "encoder", None)
        return (isinstance(getattr(model, "class_token", None), nn.Parameter)
                and isinstance(getattr(model, "conv_proj", None), nn.Module)
                and isinstance(getattr(encoder, "layers", None), nn.Sequential)
                and isinstance(getattr(encoder, "pos_embedding", None), nn.Parameter))

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.encoder.layers

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1
