"""timm's ``VisionTransformer`` (DeiT, distilled, register and no-class-token variants) and models built
the same way, such as this repository's LV-ViT: ``model.blocks`` called as ``block(x)`` with the full token
sequence, ``model.num_prefix_tokens`` prefix tokens first. An ``attn_mask`` given to the model is gathered
over the kept tokens.

Matching is structural (``blocks`` + an int ``num_prefix_tokens``), so :meth:`TimmViT.refusal` turns away
the look-alikes whose blocks see something else than that sequence: tokens that need a grid, relative
position terms, rotary tables, prefix tokens that join after or between the blocks, masks that pooling
reads after the blocks.
"""
from __future__ import annotations

import inspect
from typing import Any, List, Optional

from torch import nn

from .base import Family, has_int
from .side_inputs import attach_gathers

# model attribute -> why its prefix tokens are not the blocks' first tokens
_LATE_PREFIX = {
    "blocks_token_only": "its class token joins after the blocks (class-attention blocks, CaiT)",
    "cls_attn_blocks": "its class token joins after the blocks (class-attention blocks, XCiT)",
    "local_up_to_layer": "its class token joins between the blocks (ConViT)",
}
# parameter / buffer name prefixes of attention terms indexed by the patch grid
_RELATIVE = ("rel_pos", "relative_position", "pos_proj")


def _required_inputs(block: nn.Module) -> List[str]:
    """Names of the arguments ``block.forward`` cannot do without, the hidden states first."""
    return [p.name for p in inspect.signature(block.forward).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _relative_terms(blocks: nn.Module) -> List[str]:
    names = [name for name, _ in blocks.named_parameters()] + [name for name, _ in blocks.named_buffers()]
    names += [f"{name}.rel_indices" for name, m in blocks.named_modules() if hasattr(m, "rel_indices")]
    return [n for n in names if any(part.startswith(_RELATIVE) or part == "rel_indices" for part in n.split("."))]


class TimmViT(Family):
    name = "timm-vit"
    description = "timm VisionTransformer and look-alikes (model.blocks + model.num_prefix_tokens), LV-ViT"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)) and has_int(
            model, "num_prefix_tokens")

    def refusal(self, model: nn.Module) -> Optional[str]:
        blocks = model.blocks
        if len(blocks) == 0:
            return "it has no blocks"
        for attribute, why in _LATE_PREFIX.items():
            if getattr(model, attribute, None) is not None:
                return why
        features = getattr(model, "forward_features", None)
        if features is not None and "patch_valid" in inspect.signature(features).parameters:
            return "its NaFlex inputs carry per-patch validity masks that pooling reads after the blocks"
        if getattr(model, "rope", None) is not None:
            return "it passes rotary embeddings to its blocks outside timm's Eva class (grid-shaped output)"
        required = _required_inputs(blocks[0])
        if len(required) > 1:
            return f"its blocks need more than the token sequence ({', '.join(required[1:])})"
        relative = _relative_terms(blocks)
        if relative:
            return f"its attention uses relative position terms indexed by the patch grid ({relative[0]})"
        return None

    def attach_side_inputs(self, model: nn.Module, layer: int, state: Any) -> List[Any]:
        takes_mask = [b for b in list(model.blocks)[layer:]
                      if "attn_mask" in inspect.signature(b.forward).parameters]
        if not takes_mask:
            return []
        return attach_gathers(model.blocks, layer, state, pairs=("attn_mask",))
