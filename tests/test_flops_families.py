"""toe.flops on the EVA-02 and BEiT families: the count of each ToE stage equals thop run here on the model's
parts at the token counts the schedule keeps. Every part thop counts (Linear, LayerNorm) works per token, so
a block's count on n tokens is n times its count per token; rotary and relative-position terms count zero
(toe.flops' docstring)."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import pytest
import timm
import torch

import toe
from toe.flops import gflops_per_iteration


def _thop(module, x) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import thop
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        macs, _ = thop.profile(copy.deepcopy(module), inputs=(x,), verbose=False)
    return float(macs)


def _by_parts(model, tokens_after: int, layer: int = 1) -> float:
    dim, full = model.embed_dim, 65
    per_token = [_thop(block, torch.randn(1, full, dim)) / full for block in model.blocks]
    return (_thop(model.patch_embed, torch.randn(1, 3, 32, 32))
            + sum(c * full for c in per_token[:layer]) + sum(c * tokens_after for c in per_token[layer:])
            + _thop(model.norm, torch.randn(1, tokens_after, dim))
            + _thop(model.fc_norm, torch.randn(1, dim)) + _thop(model.head, torch.randn(1, dim)))


@pytest.mark.parametrize("name,extra", [("eva02_tiny_patch14_224", {}), ("vit_small_patch16_rope_mixed_224", {}),
                                        ("beit_base_patch16_224", dict(use_shared_rel_pos_bias=True))])
def test_stage_counts_equal_thop_by_parts(name, extra):
    torch.manual_seed(0)
    # plain nn.LayerNorm: thop's own rule then counts the norms in the parts as toe.flops does in the model
    model = timm.create_model(name, img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2, num_classes=10,
                              norm_layer=torch.nn.LayerNorm, **extra)
    schedule = toe.Schedule(r1=0.5, ng=2, k=2, epochs=4)
    res = gflops_per_iteration(model, schedule, layer=1, batch_size=2)
    assert res["num_prefix_tokens"] == 1 and res["num_patches"] == 64
    assert [s["tokens"] for s in res["stages"]] == [33, 65]
    assert res["baseline"]["macs"] == pytest.approx(_by_parts(model, 65), rel=1e-9)
    assert res["stages"][0]["macs"] == pytest.approx(_by_parts(model, 33), rel=1e-9)
    assert res["stages"][0]["macs"] < 0.7 * res["baseline"]["macs"]
    assert not toe.is_applied(model)


def test_models_toe_cannot_patch_are_counted_only_without_a_schedule():
    model = timm.create_model("test_vit_relpos", img_size=32, patch_size=4, num_classes=10)
    with pytest.raises(ValueError, match="cannot count ToE stages.*VisionTransformerRelPos"):
        gflops_per_iteration(model, toe.Schedule(r1=0.5, ng=2, k=2, epochs=4))
    res = gflops_per_iteration(model, None, batch_size=1)
    assert res["baseline"]["tokens"] == 64 and res["stages"] == []


def test_torchvision_vit_counts_like_the_same_timm_vit():
    """torchvision's attention is an nn.MultiheadAttention whose q, k, v projection thop cannot see; toe.flops
    counts its four projections, so a torchvision ViT counts exactly as the timm ViT of the same size, at
    every ToE stage. The projections are 4 x width^2 MACs per token and block: a check by hand."""
    import torchvision

    width, depth, tokens = 32, 2, 64 + 1
    schedule = toe.Schedule(r1=0.5, ng=2, k=2, epochs=4)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=depth, num_heads=2,
                                              hidden_dim=width, mlp_dim=2 * width, num_classes=10)
    tm = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth, embed_dim=width,
                           num_heads=2, mlp_ratio=2, num_classes=10, global_pool="token")
    got = gflops_per_iteration(tv, schedule, layer=1, batch_size=1, img_size=32)
    want = gflops_per_iteration(tm, schedule, layer=1, batch_size=1, img_size=32)
    assert got["baseline"]["macs"] == want["baseline"]["macs"]
    assert [s["macs"] for s in got["stages"]] == [s["macs"] for s in want["stages"]]
    # plain thop sees none of the four (the module calls its projections functionally)
    without_rule = _thop(tv, torch.randn(1, 3, 32, 32))
    assert got["baseline"]["macs"] - without_rule == depth * 4 * tokens * width * width
