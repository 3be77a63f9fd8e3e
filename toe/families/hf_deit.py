"""Hugging Face transformers ``DeiTModel`` / ``DeiTForImageClassification(WithTeacher)``: class and
distillation tokens lead the sequence (2 prefix tokens); the heads read tokens 0 and 1."""
from __future__ import annotations

from torch import nn

from .hf_base import HFVisionFamily


class HFDeiT(HFVisionFamily):
    name = "hf-deit"
    description = "transformers DeiTModel / DeiTForImageClassification(WithTeacher) (class + distillation token)"
    package = "deit"
    accepted = {"DeiTModel": "", "DeiTForImageClassification": "deit",
                "DeiTForImageClassificationWithTeacher": "deit"}
    refused = {"DeiTForMaskedImageModeling": "its decoder folds every patch token back into an image"}

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 2
