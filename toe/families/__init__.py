"""Model families ToE can patch, detected by structure. A new family is one module with one
:class:`~toe.families.base.Family` subclass, listed in ``FAMILIES`` (more specific families first)."""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from .base import Family, SideInputHook
from .hf_clip import HFCLIPVision, HFSiglipVision
from .hf_deit import HFDeiT
from .hf_dinov2 import HFDinov2, HFDinov2WithRegisters
from .hf_vit import HFViT
from .timm_beit import TimmBeit
from .timm_eva import TimmEva
from .timm_vit import TimmViT
from .torchvision_vit import TorchvisionViT

FAMILIES: List[Family] = [TimmEva(), TimmBeit(), TimmViT(), TorchvisionViT(), HFViT(), HFDeiT(), HFDinov2(),
                          HFDinov2WithRegisters(), HFCLIPVision(), HFSiglipVision()]

__all__ = ["FAMILIES", "Family", "SideInputHook", "resolve", "supported"]


def supported() -> str:
    """One line naming every supported family, for error messages."""
    return "; ".join(family.description for family in FAMILIES)


def resolve(model: nn.Module) -> Family:
    """The family of ``model`` (unwrapped); ValueError naming its class and the supported families when
    none matches, or with the reason when its family cannot patch this configuration exactly."""
    for family in FAMILIES:
        if family.matches(model):
            reason = family.refusal(model)
            if reason is not None:
                raise ValueError(f"ToE cannot patch {type(model).__name__}: {reason}")
            return family
    raise ValueError(f"ToE cannot patch {type(model).__name__}: it is not one of the supported families "
                     f"({supported()})")
