"""toe.apply on torchvision's VisionTransformer: the custom tiny size for exactness, vit_b_16 / vit_l_16 built
without weights for detection and token counts."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

import toe
from conftest import ROOT, child_env
from family_checks import (SCHEDULE, Case, check_compile_one_graph_per_stage, check_ddp,
                           check_last_stage_equals_plain, check_set_epoch_deepcopy_state_dict_remove, check_stage_one)


def build():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=5)
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero: logits would be 0
    return model


def embed(model, x):
    """What VisionTransformer.forward and Encoder.forward do before the first layer."""
    tokens = model._process_input(x)
    tokens = torch.cat([model.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    return model.encoder.dropout(tokens + model.encoder.pos_embedding)


CASE = Case("torchvision", build, embed, lambda model: model.encoder.layers, prefix=1)


def test_last_stage_equals_plain():
    check_last_stage_equals_plain(CASE)


@pytest.mark.parametrize("layer", [0, 1])
def test_stage_one_is_the_composition_by_hand(layer):
    check_stage_one(CASE, layer)


def test_set_epoch_deepcopy_state_dict_and_remove():
    check_set_epoch_deepcopy_state_dict_remove(CASE)


def test_ddp_on_one_gloo_process(tmp_path):
    check_ddp(CASE, str(tmp_path / "store"))


def test_classifier_reads_the_kept_class_token():
    """The logits of the patched model are the head on token 0 of the hand composition."""
    model = toe.apply(build(), SCHEDULE).train()
    plain = build().train()
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    tokens = embed(plain, x)
    tokens = plain.encoder.layers[0](tokens)
    tokens, _ = toe.token_expansion(tokens, toe.current_rates(model), SCHEDULE.k, num_prefix_tokens=1)
    tokens = plain.encoder.ln(plain.encoder.layers[1](tokens))
    torch.testing.assert_close(logits, plain.heads(tokens[:, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("builder", [torchvision.models.vit_b_16, torchvision.models.vit_l_16])
def test_standard_sizes_are_detected_and_reduced(builder):
    """vit_b_16 / vit_l_16 at their 224 px (196 patches), no weights: the token count entering block 1."""
    model = builder(weights=None)
    toe.apply(model, SCHEDULE)
    seen = []
    model.encoder.layers[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    model.train()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen == [1 + 98]


NO_TRANSFORMERS = """
import sys, torch, torchvision, toe, toe.families, toe.integrations
model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32,
                                             mlp_dim=64)
toe.apply(model, toe.Schedule(r1=0.5, epochs=3))
model.train()(torch.randn(1, 3, 32, 32))
print(toe.last_index(model).shape[1], "transformers" in sys.modules)
"""


def test_toe_never_imports_transformers():
    """Family detection reads class names and module paths: patching a torchvision model (and importing
    toe.integrations) leaves transformers unimported, installed or not."""
    run = subprocess.run([sys.executable, "-c", NO_TRANSFORMERS], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["33", "False"]


def test_compile_one_graph_per_stage():
    check_compile_one_graph_per_stage(CASE)
