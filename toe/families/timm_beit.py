"""timm's ``Beit`` class (BEiT, BEiT v2): relative position bias, per attention (``relative_position_bias_table``
indexed by ``relative_position_index`` [N, N], N = 1 + M with the class token at 0) and/or shared by all
blocks (``model.rel_pos_bias``, passed to each block as ``shared_rel_pos_bias`` [H, N, N]).

From block ``layer`` on, both biases are gathered at the kept tokens' positions (class token included):
[B, H, n + 1, n + 1]. The shared one arrives as a block argument and is replaced by a pre-hook; the
per-attention one is computed inside the attention from its own buffers, so its ``_get_rel_pos_bias`` is
shadowed on the instance by an override that gathers the attention's own full bias (fused and non-fused
attention both call it). A merged token keeps the position of the token it was merged into.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from .base import Family, MethodOverride, is_class
from .side_inputs import attach_gathers, gather_token_pairs


class GatheredRelPosBias(MethodOverride):
    """``attn._get_rel_pos_bias()`` -> the attention's bias [1, H, N, N], gathered to [B, H, n, n] at the
    kept positions while ToE reduces the current forward."""

    def __call__(self) -> torch.Tensor:
        bias = self.original()
        index = self.state.last_index
        if index is None:
            return bias
        return gather_token_pairs(bias, index, "relative position bias")


class TimmBeit(Family):
    name = "timm-beit"
    description = "timm Beit (BEiT, BEiT v2: relative position biases gathered for the kept tokens)"

    def matches(self, model: nn.Module) -> bool:
        return is_class(model, "timm.models.beit", "Beit")

    def refusal(self, model: nn.Module) -> Optional[str]:
        if int(model.num_prefix_tokens) != 1:
            return f"its relative position bias assumes one class token, the model has {model.num_prefix_tokens}"
        return None

    def attach_side_inputs(self, model: nn.Module, layer: int, state: Any) -> List[Any]:
        hooks: List[Any] = attach_gathers(model.blocks, layer, state, pairs=("shared_rel_pos_bias",))
        for block in list(model.blocks)[layer:]:
            if getattr(block.attn, "relative_position_bias_table", None) is not None:
                hooks.append(GatheredRelPosBias(state, block.attn, "_get_rel_pos_bias").install())
        return hooks
