"""The vision towers of Hugging Face transformers CLIP and SigLIP. CLIP: ``CLIPVisionModel`` (pooled
output = token 0 after ``post_layernorm``), ``CLIPVisionModelWithProjection``, ``CLIPForImageClassification``
(mean of the patch tokens); one class token. SigLIP: ``SiglipVisionModel`` and
``SiglipForImageClassification``, no class token (0 prefix tokens); the attention-pooling head and the
classifier's mean read every token, hence the kept ones. Layers at ``encoder.layers``. The dual
text-image models are refused: ToE applies to their ``vision_model``."""
from __future__ import annotations

from torch import nn

from .hf_base import HFVisionFamily

_DUAL = "it holds a text and a vision tower: apply ToE to model.vision_model"


class HFCLIPVision(HFVisionFamily):
    name = "hf-clip-vision"
    description = "transformers CLIPVisionModel(WithProjection) / CLIPForImageClassification (1 class token)"
    package = "clip"
    accepted = {"CLIPVisionModel": "", "CLIPVisionModelWithProjection": "vision_model",
                "CLIPForImageClassification": "vision_model"}
    refused = {"CLIPModel": _DUAL}
    layers = "encoder.layers"


class HFSiglipVision(HFVisionFamily):
    name = "hf-siglip-vision"
    description = "transformers SiglipVisionModel / SiglipForImageClassification (no class token)"
    package = "siglip"
    accepted = {"SiglipVisionModel": "", "SiglipForImageClassification": "vision_model"}
    refused = {"SiglipModel": _DUAL}
    layers = "encoder.layers"

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0
