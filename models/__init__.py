"""This repository's own model definitions, registered in timm's registry on import.

``import models`` makes ``timm.create_model("lvvit_t" | "lvvit_s" | "lvvit_m" | "lvvit_l")`` work.
"""
from .lvvit import LVViT, LVViTDenseOutput, lvvit_l, lvvit_m, lvvit_s, lvvit_t  # noqa: F401  (registers)

__all__ = ["LVViT", "LVViTDenseOutput", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"]
