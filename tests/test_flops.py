"""toe.flops: thop counts of what really runs in training, the paper's GFLOPs columns, and the CLI.

The exact-count tests compare against closed-form MAC counts written here (thop's rules: Linear =
in_features x output elements, Conv = output elements x in_channels/groups x kernel area, affine norm =
4 x input elements; attention products, GELU and the ToE op are functional and count zero).
"""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import toe
from toe import flops
from toe.flops import forward_macs, gflops_per_iteration, macs_to_gflops, main, paper_tables


def _tokens(rate: float, num_patches: int) -> int:
    return math.floor(rate * num_patches + 1e-6)


def _tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args)


def _vit_macs(tokens_per_block, *, dim=64, mlp_ratio=4, patches=64, in_chans=3, patch=4, classes=10) -> int:
    """Closed-form thop count of a timm ViT: conv patch embed, blocks on the given token counts, final norm on
    the last block's tokens, head on the CLS token."""
    macs = patches * dim * in_chans * patch * patch
    for n in tokens_per_block:
        hidden = int(dim * mlp_ratio)
        macs += 2 * 4 * n * dim  # norm1, norm2 (affine)
        macs += n * 3 * dim * dim + n * dim * dim  # qkv, proj
        macs += n * dim * hidden + n * hidden * dim  # fc1, fc2
    macs += 4 * tokens_per_block[-1] * dim + dim * classes
    return macs


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tiny_vit_matches_closed_form(layer):
    model = _tiny_vit()
    schedule = toe.Schedule(r1=0.5, ng=3, k=2, epochs=30)
    res = gflops_per_iteration(model, schedule, layer=layer, batch_size=8)
    assert res["num_patches"] == 64 and res["num_prefix_tokens"] == 1
    assert res["baseline"]["macs"] == _vit_macs([65] * 3)
    stage_gflops = []
    for st, rate, start in zip(res["stages"], (0.5, 0.75, 1.0), (0, 10, 20)):
        n = 1 + _tokens(rate, 64)
        assert (st["start_epoch"], st["epochs"], st["tokens"]) == (start, 10, n)
        expected = _vit_macs([65] * layer + [n] * (3 - layer))
        assert st["macs"] == expected
        assert st["gflops"] == pytest.approx(expected * 3 * 8 / 1e9)
        stage_gflops.append(st["gflops"])
    assert res["gflops"] == pytest.approx(sum(stage_gflops) / 3)
    assert res["speedup"] == pytest.approx(res["baseline"]["gflops"] / res["gflops"])


def test_two_prefix_tokens_and_unequal_stages():
    # Distilled-style model (CLS + register token) and explicit stage starts: the weights are the lengths.
    model = _tiny_vit(reg_tokens=1)
    schedule = toe.Schedule(r1=0.4, ng=3, epochs=10, stage_epochs=(0, 2, 7))
    res = gflops_per_iteration(model, schedule, layer=1, batch_size=4)
    assert res["num_prefix_tokens"] == 2
    lengths = [2, 5, 3]
    assert [s["epochs"] for s in res["stages"]] == lengths
    assert [s["tokens"] for s in res["stages"]] == [2 + _tokens(0.4, 64), 2 + _tokens(0.7, 64), 66]
    expected = sum(L * macs_to_gflops(_vit_macs([66] + [s["tokens"]] * 2), 4)
                   for L, s in zip(lengths, res["stages"])) / 10
    assert res["gflops"] == pytest.approx(expected)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="layer"):
        gflops_per_iteration(_tiny_vit(), toe.Schedule(r1=0.5), layer=3)
    with pytest.raises(ValueError, match="batch_size"):
        gflops_per_iteration(_tiny_vit(), None, batch_size=0)
    with pytest.raises(ValueError, match="no_such_model"):
        gflops_per_iteration("no_such_model")


def _leftovers(model: torch.nn.Module):
    """thop buffers/attributes and hooks of any kind left on an unpatched model."""
    out = []
    for name, m in model.named_modules():
        if "total_ops" in m._buffers or "total_params" in m._buffers or hasattr(m, "total_ops"):
            out.append(f"{name}: thop buffer")
        if m._forward_hooks or m._forward_pre_hooks:
            out.append(f"{name}: hook")
    return out


def test_callers_model_untouched_and_nothing_printed(capsys):
    model = _tiny_vit().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gflops_per_iteration(model, toe.Schedule(r1=0.5), batch_size=2)
    forward_macs(model)
    assert not model.training
    assert _leftovers(model) == []
    assert not toe.is_applied(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)

    # A caller's model that already carries ToE keeps exactly its own hook and epoch.
    patched = toe.apply(_tiny_vit(), toe.Schedule(r1=0.5, epochs=30), layer=2)
    toe.set_epoch(patched, 15)
    hooks = [dict(b._forward_pre_hooks) for b in patched.blocks]
    res = gflops_per_iteration(patched, toe.Schedule(r1=0.4, epochs=30), layer=1)
    assert res["stages"][0]["tokens"] == 1 + _tokens(0.4, 64)  # counted with the schedule given, at layer 1
    assert [dict(b._forward_pre_hooks) for b in patched.blocks] == hooks
    assert toe.current_rates(patched)[-1] == 0.75
    assert all("total_ops" not in m._buffers and not m._forward_hooks for m in patched.modules())
    # In train mode with ToE at stage 2, forward_macs counts the reduced model that runs.
    assert forward_macs(patched.train()) == _vit_macs([65, 65, 1 + _tokens(0.75, 64)])

    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# The paper's printed GFLOPs per training iteration (batch 1024, 300 epochs, ng=3, k=2, ToE after block 1).
TABLE2 = {
    "deit_tiny_patch16_224": (3.3e3, {0.5: 2.6e3}),
    "deit_small_patch16_224": (1.3e4, {0.5: 1.0e4}),
    "deit_base_patch16_224": (5.2e4, {0.5: 4.0e4, 0.4: 3.8e4}),
}


def _two_digits(value: float) -> float:
    return float(f"{value:.1e}")


@pytest.mark.parametrize("name", list(TABLE2))
def test_table2_deit(name):
    baseline, toe_rows = TABLE2[name]
    model = flops.create_model(name)
    for r1, printed in toe_rows.items():
        res = gflops_per_iteration(model, toe.Schedule(r1=r1, ng=3, k=2, epochs=300), layer=1)
        assert _two_digits(res["baseline"]["gflops"]) == baseline
        assert _two_digits(res["gflops"]) == printed, (name, r1, res["gflops"])


def test_table8_layers_via_paper_tables():
    results = paper_tables(["8"])
    rows = results[0]["rows"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    for row, printed in zip(rows, (2.51e3, 2.58e3, 2.65e3, 2.71e3)):
        assert abs(row["gflops"] - printed) <= 0.01 * printed, row
        assert row["tokens"] == [99, 148, 197] and row["agrees"]
    text = flops.format_paper_tables(results)
    assert text.count("✓") == 4 and "4/4 computed values agree" in text


def _lvvit_macs(tokens_per_block, *, dim, classes=1000, stem=64, grid=14) -> int:
    """Closed-form thop count of LV-ViT (conv stem with affine BN, mlp ratio 3, cls head, aux head)."""
    side = grid * 8  # 224 / 2 after the stride-2 first conv
    macs = side * side * stem * 3 * 7 * 7 + 2 * side * side * stem * stem * 3 * 3  # three stem convs
    macs += 3 * 4 * side * side * stem  # three BatchNorm2d
    macs += grid * grid * dim * stem * 8 * 8  # projection conv, kernel = stride = 8
    for n in tokens_per_block:
        macs += 2 * 4 * n * dim + 4 * n * dim * dim + 2 * n * dim * 3 * dim
    n = tokens_per_block[-1]
    return macs + 4 * n * dim + dim * classes + (n - 1) * dim * classes


# (dim, depth, printed baseline, printed ToE r1=0.4)
TABLE3 = {"lvvit_t": (240, 12, 8.2e3, 7.0e3), "lvvit_s": (384, 16, 1.9e4, 1.4e4), "lvvit_m": (512, 20, 3.7e4, 2.7e4)}


@pytest.mark.parametrize("name", list(TABLE3))
def test_table3_lvvit(name):
    dim, depth, baseline, printed = TABLE3[name]
    res = gflops_per_iteration(name, toe.Schedule(r1=0.4, ng=3, k=2, epochs=300), layer=1)
    assert res["baseline"]["macs"] == _lvvit_macs([197] * depth, dim=dim)
    for st in res["stages"]:
        assert st["macs"] == _lvvit_macs([197] + [st["tokens"]] * (depth - 1), dim=dim)
    assert [s["tokens"] for s in res["stages"]] == [79, 138, 197]
    assert _two_digits(res["baseline"]["gflops"]) == baseline
    if name == "lvvit_s":
        # The printed 1.4e4 is out of reach with ToE after block 1: the exact count is 1.463e4 (see the
        # note printed by --paper-tables); the closed form above pins what is counted.
        assert _two_digits(res["gflops"]) == 1.5e4
    else:
        assert _two_digits(res["gflops"]) == printed


def test_cli_json_last_line(capsys):
    assert main(["--model", "deit_tiny_patch16_224", "--toe-r1", "0.5", "--toe-ng", "3", "--toe-k", "2",
                 "--batch-size", "1024", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "theoretical speedup" in "\n".join(out)
    data = json.loads(out[-1])
    assert [s["tokens"] for s in data["stages"]] == [99, 148, 197]
    assert abs(data["gflops"] - 2.58e3) <= 0.01 * 2.58e3
    assert data["speedup"] == pytest.approx(data["baseline"]["gflops"] / data["gflops"])


@pytest.mark.parametrize("argv, needle", [
    (["--toe-r1", "1.5"], "r1"),
    (["--model", "no_such_model"], "no_such_model"),
    (["--batch-size", "0"], "batch-size"),
    (["--bogus"], "--bogus"),
    (["--toe-r1", "abc"], "--toe-r1"),
])
def test_cli_bad_input(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
