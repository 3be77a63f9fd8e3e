"""benchmarks/families.py: every model it builds maps images to logits and takes ToE (tiny images here)."""
from __future__ import annotations

import pytest
import torch

import toe
from conftest import load_script, require_transformers

families = load_script("benchmarks/families.py")
PREFIX = {"torchvision_vit_tiny": 1, "hf_vit_tiny": 1, "hf_deit_tiny": 2, "hf_dinov2_tiny": 1}


@pytest.mark.parametrize("family", families.FAMILIES)
def test_models_give_logits_and_take_toe(family):
    if family == "transformers":
        require_transformers()
    built = families.build(family, img_size=64)  # 16 patch tokens
    expected = {"torchvision": ["torchvision_vit_tiny"],
                "transformers": ["hf_vit_tiny", "hf_deit_tiny", "hf_dinov2_tiny"]}
    assert [name for name, _, _ in built] == expected[family]
    for name, model, img_size in built:
        toe.apply(model, toe.Schedule(r1=0.5, ng=3, epochs=3))
        model.train()
        logits = model(torch.randn(2, 3, img_size, img_size))
        assert logits.shape == (2, families.NUM_CLASSES), name
        assert toe.last_index(model).shape[1] == PREFIX[name] + 8, name  # prefix + floor(0.5 * 16) patch tokens


def test_bad_family_and_size_are_refused():
    with pytest.raises(ValueError, match="--family must be one of torchvision, transformers"):
        families.build("timm")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        families.build("torchvision", img_size=40)
