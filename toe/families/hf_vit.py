"""Hugging Face transformers ``ViTModel`` / ``ViTForImageClassification``: ``layers`` on the ViTModel,
one class token; the classifier and the pooler read token 0."""
from __future__ import annotations

from .hf_base import HFVisionFamily


class HFViT(HFVisionFamily):
    name = "hf-vit"
    description = "transformers ViTModel / ViTForImageClassification (1 class token)"
    package = "vit"
    accepted = {"ViTModel": "", "ViTForImageClassification": "vit"}
    refused = {"ViTForMaskedImageModeling": "its decoder folds every patch token back into an image"}
