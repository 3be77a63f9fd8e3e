"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers",
NeurIPS 2021), registered in timm's model registry.

Architecture facts (from the paper / issue 4):
  * patch embedding = 4-layer conv stem: conv7x7 s2 -> BN -> ReLU, 2x (conv3x3 -> BN -> ReLU) at
    ``stem_chans`` channels (64; 128 for lvvit_l), then a projection conv with kernel = stride = patch/2;
  * pre-norm transformer blocks, mlp ratio 3, qkv without bias, each residual branch divided by ``skip_lam``;
  * cls token + learned absolute position embedding, final LayerNorm;
  * ``head`` on the cls token and a dense ``aux_head`` (Linear) on every patch token.

Outputs
  * eval (or training without ``return_dense``): ``cls_logits + aux_eval_weight * max_tokens(aux_logits)``,
    a [B, num_classes] tensor, so the model drops into any classification pipeline.
  * training with ``return_dense=True``: :class:`LVViTDenseOutput` ``(cls, aux, bbox, mask)`` with
    ``cls`` [B, C], ``aux`` [B, M, C] on the FULL patch grid (M = grid_h * grid_w, row-major), ``bbox``
    the MixToken box ``(top, left, bottom, right)`` in patch units or None, and ``mask`` a bool [B, M]
    of supervised positions or None (= all positions).

MixToken (``mix_token=True``, training with ``return_dense``): a box on the patch grid, area fraction
``1 - lam`` with ``lam ~ Beta(1, 1)``, is filled with the patch embeddings of the batch-flipped sample
(sample b gets sample B-1-b's patches there). Afterwards the aux logits (and the mask) are un-mixed the
same way, so aux position (b, i) again describes sample b's own content at i and is supervised by
sample b's own dense label. The class target must be mixed by the loss with lam = 1 - box area / M
(see ``token_label.loss.TokenLabelCrossEntropy``).

Token Expansion (``toe.apply(model, schedule)``): the model exposes ``blocks`` and
``num_prefix_tokens`` (= 1), so the ``toe`` pre-hook on ``blocks[layer]`` reduces the sequence in
training. After the blocks, ``toe.last_assignment(model)`` maps every original patch position to the
token that now represents it; the aux logits are spread back to the full grid from it:
  * ``toe_dense_loss='merged'`` (default): position i gets the logits of the token that represents it
    (itself if kept, the token it was merged into otherwise);
  * ``toe_dense_loss='kept'``: the same gather, but ``mask`` marks only the positions whose own token was
    kept, so the loss ignores the others;
  * ``toe_dense_loss='zero'``: what the official ToE LV-ViT code does, and so what reproduces Table 3 as
    published: every position ToE removed gets a zero FEATURE vector after the final norm, and ``aux_head``
    is applied to it, so its logits are ``aux_head(0)`` (= ``aux_head.bias``) and it is still supervised (no
    mask): its loss trains the bias. Kept positions get their own token's logits.
In 'merged' and 'kept', positions dropped by ToE with merging off (assignment -1) have no representing
token and are masked out.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["LVViT", "LVViTDenseOutput", "ConvStemPatchEmbed", "LVViTBlock", "mixtoken_box", "mix_grid",
           "TOE_DENSE_LOSS_MODES", "spread_to_positions"]

TOE_DENSE_LOSS_MODES = ("merged", "kept", "zero")

BBox = Tuple[int, int, int, int]


class LVViTDenseOutput(NamedTuple):
    """Training output of LV-ViT with ``return_dense=True``.

    cls:  [B, num_classes] logits of the cls token.
    aux:  [B, M, num_classes] aux logits on the full patch grid (row-major, MixToken un-mixed).
    bbox: MixToken box (top, left, bottom, right) in patch units, or None when MixToken was not applied.
    mask: bool [B, M], True where ``aux`` is supervised, or None when every position is.
    """
    cls: torch.Tensor
    aux: torch.Tensor
    bbox: Optional[BBox]
    mask: Optional[torch.Tensor]


class ConvStemPatchEmbed(nn.Module):
    """4-layer convolutional patch embedding.

    [B, in_chans, H, W] -> [B, embed_dim, H / patch, W / patch]. The three stem convs run at stride 2
    (first conv only), the projection conv has kernel = stride = patch_size / 2.
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 stem_chans: int = 64, embed_dim: int = 384) -> None:
        super().__init__()
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"patch_size must be an even number >= 2, got {patch_size}")
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {tuple(img_size)} must be divisible by patch_size {patch_size}")
        self.img_size = tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        def conv_bn_relu(cin: int, cout: int, k: int, s: int) -> list:
            return [nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(
            *conv_bn_relu(in_chans, stem_chans, 7, 2),
            *conv_bn_relu(stem_chans, stem_chans, 3, 1),
            *conv_bn_relu(stem_chans, stem_chans, 3, 1),
        )
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x))


class LVViTBlock(nn.Module):
    """Pre-norm transformer block whose residual branches are scaled by 1 / skip_lam. [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 skip_lam: float = 1.0, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: type = nn.LayerNorm, act_layer: type = nn.GELU) -> None:
        super().__init__()
        self.skip_lam = float(skip_lam)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x))) / self.skip_lam
        x = x + self.drop_path2(self.mlp(self.norm2(x))) / self.skip_lam
        return x


def mixtoken_box(grid_h: int, grid_w: int, lam: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> BBox:
    """Sample a MixToken box on a grid_h x grid_w patch grid.

    lam ~ Beta(1, 1) (= U(0, 1)); the box has side fractions sqrt(1 - lam) and a uniformly drawn centre,
    clipped to the grid (CutMix-style), so the effective mixing ratio is 1 - area / (grid_h * grid_w).
    Uses torch's RNG so a checkpointed torch RNG state reproduces it. Returns (top, left, bottom, right).
    """
    if lam is None:
        lam = float(torch.rand((), generator=generator))
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(grid_h * cut), int(grid_w * cut)
    cy = int(torch.randint(grid_h, (), generator=generator))
    cx = int(torch.randint(grid_w, (), generator=generator))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, grid_h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, grid_w)
    return top, left, bottom, right


def mix_grid(x: torch.Tensor, bbox: BBox, channels_last: bool) -> torch.Tensor:
    """Swap the box region of x with the batch-flipped x. Its own inverse.

    x: [B, D, H, W] (channels_last=False) or [B, H, W, D] (channels_last=True).
    """
    top, left, bottom, right = bbox
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    inside = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    inside[top:bottom, left:right] = True
    inside = inside[None, :, :, None] if channels_last else inside[None, None]
    # torch.where instead of in-place slice assignment: autograd- and compile-friendly.
    return torch.where(inside, x.flip(0), x)


class LVViT(nn.Module):
    """LV-ViT: conv-stem ViT with a dense aux head (token labeling) and MixToken.

    Input [B, in_chans, H, W]. See the module docstring for the outputs.
    """

    def __init__(
            self,
            img_size: Union[int, Sequence[int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 384,
            depth: int = 16,
            num_heads: int = 6,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = False,
            skip_lam: float = 1.0,
            stem_chans: int = 64,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Optional[type] = None,
            return_dense: bool = False,
            mix_token: bool = False,
            toe_dense_loss: str = "merged",
            aux_eval_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if toe_dense_loss not in TOE_DENSE_LOSS_MODES:
            raise ValueError(f"toe_dense_loss must be one of {TOE_DENSE_LOSS_MODES}, got {toe_dense_loss!r}")
        norm_layer = norm_layer or nn.LayerNorm
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.global_pool = "token"
        self.return_dense = return_dense
        self.mix_token = mix_token
        self.toe_dense_loss = toe_dense_loss
        self.aux_eval_weight = aux_eval_weight
        self.grad_checkpointing = False

        self.patch_embed = ConvStemPatchEmbed(img_size, patch_size, in_chans, stem_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        # stochastic depth decay rule (plain floats: also works under a meta-device context)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            LVViTBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, skip_lam=skip_lam,
                       proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                       norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm-style conveniences -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace ``head`` and ``aux_head`` with fresh Linear layers for ``num_classes`` (0 = Identity)."""
        if global_pool not in (None, "token"):
            raise ValueError(f"LV-ViT only supports global_pool='token', got {global_pool!r}")
        self.num_classes = num_classes
        dev = self.cls_token.device
        for name in ("head", "aux_head"):
            layer = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            if num_classes > 0:
                self._init_weights(layer)
            setattr(self, name, layer.to(dev))

    # ---- forward ------------------------------------------------------------------------------------
    def _tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] patch embeddings -> [B, 1 + h*w, D] with cls token and position embedding."""
        x = grid.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        # Blocks are always called through Module.__call__, so a toe pre-hook on blocks[layer] runs.
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, H, W] -> normalised tokens [B, 1 + n, D] (n = M, or fewer while ToE runs). No MixToken."""
        return self.norm(self._blocks(self._tokens(self.patch_embed(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalised tokens [B, 1 + n, D] -> cls + aux_eval_weight * max_n aux logits [B, C] (or cls features)."""
        cls = self.head_drop(x[:, 0])
        if pre_logits:
            return cls
        return self.head(cls) + self.aux_eval_weight * self.aux_head(x[:, self.num_prefix_tokens:]).max(1)[0]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, LVViTDenseOutput]:
        dense = self.training and self.return_dense
        grid = self.patch_embed(x)
        gh, gw = grid.shape[-2:]
        bbox = None
        if dense and self.mix_token:
            bbox = mixtoken_box(gh, gw)
            grid = mix_grid(grid, bbox, channels_last=False)
        t = self.norm(self._blocks(self._tokens(grid)))
        if not dense:
            return self.forward_head(t)
        cls = self.head(self.head_drop(t[:, 0]))
        aux = self.aux_head(t[:, self.num_prefix_tokens:])  # [B, n, C], n < M while ToE runs
        aux, mask = self._spread_to_grid(aux, gh * gw)
        if bbox is not None:
            b, m, c = aux.shape
            aux = mix_grid(aux.reshape(b, gh, gw, c), bbox, channels_last=True).reshape(b, m, c)
            if mask is not None:
                mask = mix_grid(mask.reshape(b, gh, gw, 1), bbox, channels_last=True).reshape(b, m)
        return LVViTDenseOutput(cls, aux, bbox, mask)

    def _spread_to_grid(self, aux: torch.Tensor, num_patches: int
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-token aux logits [B, n, C] -> (aux [B, M, C], mask [B, M] or None) using ToE's assignment."""
        assignment = _toe_assignment(self)
        if assignment is None:
            if aux.shape[1] != num_patches:
                raise RuntimeError(f"LV-ViT: {aux.shape[1]} patch tokens after the blocks but {num_patches} "
                                   "patches and no ToE assignment; a token-reduction hook must record one")
            return aux, None
        kept_index = _toe_index(self) if self.toe_dense_loss in ("kept", "zero") else None
        # 'zero': the head of a zero feature, aux_head(0) = bias for a Linear head, with its gradient path
        fill = self.aux_head(aux.new_zeros(self.embed_dim)) if self.toe_dense_loss == "zero" else None
        return spread_to_positions(aux, assignment, self.num_prefix_tokens, self.toe_dense_loss, kept_index, fill)


def spread_to_positions(aux: torch.Tensor, assignment: torch.Tensor, num_prefix_tokens: int = 1,
                        mode: str = "merged", kept_index: Optional[torch.Tensor] = None,
                        fill: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Spread per-token outputs of a token-reduced sequence back to all M original patch positions.

    aux: [B, n, C] outputs of the n patch tokens (prefix tokens removed).
    assignment: [B, M] slot, in the reduced sequence INCLUDING the P prefix tokens, of the token that
      represents each original patch position (``toe.last_assignment``); -1 if dropped.
    mode: "merged" supervises every position by its representing token; "kept" only positions whose own
      token was kept; "zero" (the official ToE code, Table 3 as published) gives kept positions their own
      token's values and every other position ``fill`` [C] (zeros when None; LV-ViT passes the aux head of a
      zero feature, its bias), all supervised. "kept" and "zero" need
      ``kept_index`` [B, P + n] (``toe.last_index``: positions of the kept tokens in the unreduced sequence).
    Returns (out [B, M, C], mask bool [B, M] or None when every position is supervised). "merged"/"kept":
    out[b, i] = aux[b, assignment[b, i] - P], and masked positions still hold a representing token's values.
    """
    if mode not in TOE_DENSE_LOSS_MODES:
        raise ValueError(f"mode must be one of {TOE_DENSE_LOSS_MODES}, got {mode!r}")
    if mode in ("kept", "zero") and kept_index is None:
        raise ValueError(f"mode={mode!r} needs kept_index (toe.last_index)")
    p = num_prefix_tokens
    if mode == "zero":
        own = kept_index.to(aux.device).long()[:, p:] - p  # [B, n] original positions of the kept tokens
        b, m, c = aux.shape[0], assignment.shape[1], aux.shape[-1]
        base = aux.new_zeros(b, m, c) if fill is None else fill.to(aux.dtype).expand(b, m, c)
        out = base.scatter(1, own.unsqueeze(-1).expand(-1, -1, c), aux)
        return out, None
    slot = assignment.to(aux.device).long() - p  # < 0 where the position was dropped
    valid = slot >= 0
    out = aux.gather(1, slot.clamp(min=0).unsqueeze(-1).expand(-1, -1, aux.shape[-1]))
    if mode == "kept":
        own = kept_index.to(aux.device).long()[:, p:] - p  # [B, n] original positions of the kept tokens
        kept = torch.zeros_like(valid)
        kept.scatter_(1, own, True)
        valid = valid & kept
    mask = None if bool(valid.all()) else valid
    return out, mask


def _toe_assignment(model: nn.Module) -> Optional[torch.Tensor]:
    """toe.last_assignment(model) when ToE is applied to the model, else None."""
    import toe  # lazy: keeps `import models` independent of the toe package import order
    if not toe.is_applied(model):
        return None
    return toe.last_assignment(model)


def _toe_index(model: nn.Module) -> Optional[torch.Tensor]:
    import toe
    return toe.last_index(model)


# ---- registry -----------------------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.stem.0", "classifier": ("head", "aux_head"), **kwargs,
    }


# crop_pct: LV-ViT's published evaluation crops (T/S 0.9, M and L 1.0). Both heads are sized to the classes,
# so both are "classifier" layers (fine-tuning to another class count re-initialises both).
default_cfgs = generate_default_cfgs({
    "lvvit_t": _cfg(crop_pct=0.9),
    "lvvit_s": _cfg(crop_pct=0.9),
    "lvvit_m": _cfg(crop_pct=1.0),
    "lvvit_l": _cfg(input_size=(3, 288, 288), crop_pct=1.0),
})


def _create_lvvit(variant: str, pretrained: bool = False, **kwargs: Any) -> LVViT:
    return build_model_with_cfg(LVViT, variant, pretrained, **kwargs)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-T: depth 12, dim 240, 4 heads, skip_lam 1 (8.53M params at 1000 classes)."""
    args = dict(embed_dim=240, depth=12, num_heads=4, skip_lam=1.0)
    return _create_lvvit("lvvit_t", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_s(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-S: depth 16, dim 384, 6 heads, skip_lam 2 (26.15M params)."""
    args = dict(embed_dim=384, depth=16, num_heads=6, skip_lam=2.0)
    return _create_lvvit("lvvit_s", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_m(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-M: depth 20, dim 512, 8 heads, skip_lam 2 (55.83M params)."""
    args = dict(embed_dim=512, depth=20, num_heads=8, skip_lam=2.0)
    return _create_lvvit("lvvit_m", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_l(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-L: depth 24, dim 768, 12 heads, skip_lam 3, 128 stem channels, 288px by default."""
    args = dict(embed_dim=768, depth=24, num_heads=12, skip_lam=3.0, stem_chans=128)
    return _create_lvvit("lvvit_l", pretrained, **dict(args, **kwargs))
