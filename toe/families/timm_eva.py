"""timm's ``Eva`` class: EVA, EVA-02, the ViT-RoPE models (``vit_*_rope_*``, axial and mixed), Perception
Encoder and DINOv3 backbones. The model computes one rotary embedding table and passes it to every block as
``rope`` (positionally under some checkpoint paths): rows [M, 2D] (axial 'cat', DINOv3, MRoPE), or per block
[H, M, 2D] (mixed); with patch dropout timm gives it a batch dimension first ([B, 1 | H, M', 2D]).

From block ``layer`` on, each block receives the rows of the kept patch tokens, [B, 1 | H, n, 2D]; prefix
tokens carry no rotary embedding (timm applies it after the first ``num_prefix_tokens``). A merged token sits
in the slot of the token it was merged into, so it keeps that token's position. Train-time coordinate
augmentation (``rope_shift_coords`` / ``jitter`` / ``rescale``) draws one transform per forward, shared by
all blocks, and is gathered like any other table: exact. An ``attn_mask`` given to the model is gathered
over the kept tokens too.
"""
from __future__ import annotations

from typing import Any, List, Optional

from torch import nn

from .base import Family, is_class
from .side_inputs import attach_gathers

#: rotary tables whose rows are one per patch token along dim -2, applied after the prefix tokens
ROPE_CLASSES = ("RotaryEmbeddingCat", "RotaryEmbeddingMixed", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMRope")


class TimmEva(Family):
    name = "timm-eva"
    description = "timm Eva (EVA, EVA-02, ViT-RoPE, PE, DINOv3: rotary rows follow the kept tokens)"

    def matches(self, model: nn.Module) -> bool:
        return is_class(model, "timm.models.eva", "Eva")

    def refusal(self, model: nn.Module) -> Optional[str]:
        rope = getattr(model, "rope", None)
        if rope is not None and type(rope).__name__ not in ROPE_CLASSES:
            return (f"its rotary embedding {type(rope).__name__} has a layout ToE does not know "
                    f"(supported: {', '.join(ROPE_CLASSES)})")
        prefix = int(model.num_prefix_tokens)
        for i, block in enumerate(model.blocks):
            attn_prefix = getattr(getattr(block, "attn", None), "num_prefix_tokens", prefix)
            if attn_prefix != prefix:
                return (f"block {i} applies rotary embeddings after {attn_prefix} prefix tokens, the model has "
                        f"{prefix}")
        return None

    def attach_side_inputs(self, model: nn.Module, layer: int, state: Any) -> List[Any]:
        return attach_gathers(model.blocks, layer, state, rows=("rope",), pairs=("attn_mask",))
