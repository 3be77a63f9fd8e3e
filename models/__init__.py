"""This repository's own model definitions, registered in timm's registry on import.

``import models`` makes ``timm.create_model("lvvit_t" | "lvvit_s" | "lvvit_m" | "lvvit_l")`` work.
"""
from .lvvit import (TOE_DENSE_LOSS_MODES, LVViT, LVViTDenseOutput, lvvit_l, lvvit_m,  # noqa: F401  (registers)
                    lvvit_s, lvvit_t)

__all__ = ["LVViT", "LVViTDenseOutput", "TOE_DENSE_LOSS_MODES", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"]
