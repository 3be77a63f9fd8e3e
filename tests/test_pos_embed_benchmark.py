"""benchmarks/pos_embed_curriculum.py: the official phase change (pos_embed and Adam moments upsampled
bilinearly) and the smoothness figures docs/fidelity.md quotes."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
bench = load_script("benchmarks/pos_embed_curriculum.py")


def test_grow_resamples_pos_embed_and_its_adam_moments_only():
    torch.manual_seed(0)
    model = bench._model(24, dynamic=False)  # 6 x 6 grid
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 24, 24)).sum().backward()
    optimizer.step()
    old_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    old_pos = model.pos_embed.detach().clone()
    new, new_opt = bench._grow(model, optimizer, 32, 4, 1e-3)
    assert new.pos_embed.shape == (1, 1 + 64, 64) and new.patch_embed.grid_size == (8, 8)
    # reference: the patch part as a [1, C, 6, 6] image, bilinear (half-pixel centres) to 8 x 8, CLS kept
    def up(t):
        grid = t[:, 1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
        return torch.cat([t[:, :1], grid.flatten(2).transpose(1, 2)], 1)

    torch.testing.assert_close(new.pos_embed.detach(), up(old_pos), rtol=0, atol=0)
    for name, p in new.named_parameters():
        state = new_opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            expected = up(old_state[name][key]) if name == "pos_embed" else old_state[name][key]
            torch.testing.assert_close(state[key], expected, rtol=0, atol=0, msg=f"{name} {key}")
    new(torch.randn(2, 3, 32, 32)).sum().backward()
    new_opt.step()  # the resampled moments fit the new parameter


def test_describe_tells_a_smooth_grid_from_noise():
    side = 8
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    channels = torch.stack([torch.cos(1.5 * ys + 0.3 * c) * torch.sin(1.2 * xs - 0.2 * c) for c in range(16)])
    smooth = torch.cat([torch.zeros(1, 1, 16), channels.flatten(1).t()[None]], 1)
    noise = torch.randn(1, 1 + side * side, 16, generator=torch.Generator().manual_seed(1))
    a, b = bench.describe(smooth, side, 6), bench.describe(noise, side, 6)
    assert a["high_freq_share"] < 0.05 < b["high_freq_share"]
    assert a["neighbour_cos"] > 0.5 > abs(b["neighbour_cos"])
