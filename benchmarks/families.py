"""Models of the torchvision and Hugging Face transformers families for the ToE benchmarks, DeiT-Tiny sized
(192 wide, 12 layers, 3 heads, MLP 768, patch 16), random weights, nothing downloaded.

``build(family, img_size)`` returns ``[(name, model, img_size), ...]``; every model maps images
[B, 3, img_size, img_size] to logits [B, NUM_CLASSES], so a step can use cross-entropy on it directly, and
``toe.apply`` accepts it (transformers models sit in a ``module`` wrapper, which toe unwraps like DDP). The
patched blocks are ``toe.families.resolve(toe.unwrap_model(model)).blocks(...)``. Meant to be wired into
bench_toe.py as ``--family torchvision|transformers``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

FAMILIES = ("torchvision", "transformers")
NUM_CLASSES = 1000
WIDTH, DEPTH, HEADS, MLP, PATCH = 192, 12, 3, 768, 16


class Logits(nn.Module):
    """A transformers classifier called on pixels, returning its ``logits`` tensor (the child is named
    ``module`` and the wrapper has no parameters of its own, so toe.apply / set_epoch see through it)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=images).logits


def _torchvision(img_size: int) -> List[Tuple[str, nn.Module, int]]:
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=img_size, patch_size=PATCH, num_layers=DEPTH,
                                                 num_heads=HEADS, hidden_dim=WIDTH, mlp_dim=MLP,
                                                 num_classes=NUM_CLASSES)
    return [("torchvision_vit_tiny", model, img_size)]


def _transformers(img_size: int) -> List[Tuple[str, nn.Module, int]]:
    import transformers

    size = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=img_size,
                patch_size=PATCH, num_labels=NUM_CLASSES)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(**size, intermediate_size=MLP))
    deit = transformers.DeiTForImageClassification(transformers.DeiTConfig(**size, intermediate_size=MLP))
    dinov2 = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**size, mlp_ratio=MLP // WIDTH))
    return [("hf_vit_tiny", Logits(vit), img_size), ("hf_deit_tiny", Logits(deit), img_size),
            ("hf_dinov2_tiny", Logits(dinov2), img_size)]


def build(family: str, img_size: int = 224) -> List[Tuple[str, nn.Module, int]]:
    """``[(name, model, img_size)]`` of ``family`` (one of FAMILIES); ValueError for another name."""
    builders = {"torchvision": _torchvision, "transformers": _transformers}
    if family not in builders:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if img_size < PATCH or img_size % PATCH:
        raise ValueError(f"--img-size must be a positive multiple of the patch size {PATCH}, got {img_size}")
    return builders[family](img_size)
