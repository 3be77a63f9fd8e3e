"""Hugging Face transformers ``Dinov2Model`` (class token) and ``Dinov2WithRegistersModel`` (class token,
then ``config.num_register_tokens`` registers), with their image classifiers (class token next to the mean
of the patch tokens, which then averages the kept tokens). Layers at ``encoder.layer``."""
from __future__ import annotations

from torch import nn

from .hf_base import HFVisionFamily

_BACKBONE = "its feature maps fold every patch token back onto the image grid"


class HFDinov2(HFVisionFamily):
    name = "hf-dinov2"
    description = "transformers Dinov2Model / Dinov2ForImageClassification (1 class token)"
    package = "dinov2"
    accepted = {"Dinov2Model": "", "Dinov2ForImageClassification": "dinov2"}
    refused = {"Dinov2Backbone": _BACKBONE}
    layers = "encoder.layer"


class HFDinov2WithRegisters(HFVisionFamily):
    name = "hf-dinov2-registers"
    description = "transformers Dinov2WithRegistersModel / ...ForImageClassification (class token + registers)"
    package = "dinov2_with_registers"
    accepted = {"Dinov2WithRegistersModel": "", "Dinov2WithRegistersForImageClassification": "dinov2_with_registers"}
    refused = {"Dinov2WithRegistersBackbone": _BACKBONE}
    layers = "encoder.layer"

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1 + int(model.config.num_register_tokens)
