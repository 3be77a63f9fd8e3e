"""How the curriculum's position embeddings end up under three handlings (docs/fidelity.md, Table 4).

  fourier   this repository's default: one full-size pos_embed, resampled (timm's dynamic_img_size, bicubic) to
            each phase's grid on every forward; the loader yields full-size images, frequency_crop shrinks them
  resize    the same model; the loader crops straight to the phase size
  official  EfficientTrain's code: the model is built at the phase size, and at a phase change its pos_embed
            and the pos_embed's Adam moments are upsampled bilinearly to the new grid (fourier inputs)

All three start from the same weights (the official model's first grid is the bilinear resample of the
full-size init) and see the same image order. Printed per handling: top-1 at the final size, the share of the
final pos_embed grid's energy above the lowest (phase-1 grid) frequencies, the mean cosine similarity of
each position's embedding to its 4 neighbours against positions >= 3 apart, and the distances between handlings.

    python benchmarks/pos_embed_curriculum.py --data-path ../shared/data/imagenette-mini-64 --epochs 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from toe.curriculum import Curriculum, frequency_crop  # noqa: E402

MODEL = dict(patch_size=4, depth=3, embed_dim=64, num_heads=2, num_classes=10)


def _grid(pos: torch.Tensor, side: int) -> torch.Tensor:
    """[1, 1 + side^2, C] (CLS first) -> the patch part as [1, C, side, side]."""
    return pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)


def resample(pos: torch.Tensor, side: int, new_side: int, mode: str = "bilinear") -> torch.Tensor:
    """A [1, 1 + side^2, C] pos_embed (or its Adam moment) on a new_side grid, CLS entry kept."""
    grid = F.interpolate(_grid(pos, side), size=(new_side, new_side), mode=mode, align_corners=False)
    return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def _model(size: int, dynamic: bool):
    import timm

    return timm.create_model("deit_tiny_patch16_224", img_size=size, dynamic_img_size=dynamic, **MODEL)


def _grow(model, optimizer, size: int, patch: int, lr: float):
    """The official phase change: a model at ``size`` with pos_embed and its Adam moments upsampled."""
    old_side, new_side = model.patch_embed.grid_size[0], size // patch
    state = model.state_dict()
    state["pos_embed"] = resample(state["pos_embed"], old_side, new_side)
    opt_state = optimizer.state_dict()
    index = [name for name, _ in model.named_parameters()].index("pos_embed")
    for key in ("exp_avg", "exp_avg_sq"):
        opt_state["state"][index][key] = resample(opt_state["state"][index][key], old_side, new_side)
    new = _model(size, dynamic=False)
    new.load_state_dict(state)
    new_opt = torch.optim.AdamW(new.parameters(), lr=lr, weight_decay=0.05)
    new_opt.load_state_dict(opt_state)
    return new, new_opt


def train(handling: str, data: str, epochs: int, size: int, lr: float, init: Dict[str, torch.Tensor],
          seed: int = 0):
    from torchvision import datasets, transforms

    patch = MODEL["patch_size"]
    curriculum = Curriculum.efficienttrain(epochs, size, patch)
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = _model(size, dynamic=True)
    model.load_state_dict(init)
    if handling == "official":
        first = curriculum.input_size(0)
        state = dict(init, pos_embed=resample(init["pos_embed"], size // patch, first // patch))
        model = _model(first, dynamic=False)
        model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    for epoch in range(epochs):
        phase = curriculum.input_size(epoch)
        if handling == "official" and model.patch_embed.img_size[0] != phase:
            model, optimizer = _grow(model, optimizer, phase, patch, lr)
        crop = phase if handling == "resize" else size
        train_set = datasets.ImageFolder(os.path.join(data, "train"), transforms.Compose([
            transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
        loader = torch.utils.data.DataLoader(train_set, batch_size=50, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        torch.manual_seed(seed * 1000 + 100 + epoch)
        model.train()
        for images, labels in loader:
            if handling != "resize" and phase < size:
                images = frequency_crop(images, phase)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    val = datasets.ImageFolder(os.path.join(data, "val"), transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), norm]))
    model.eval()
    hits = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(val, batch_size=100):
            hits += int((model(images).argmax(1) == labels).sum())
    return model.pos_embed.detach().clone(), 100.0 * hits / len(val)


def describe(pos: torch.Tensor, side: int, low: int) -> Dict[str, float]:
    """High-frequency energy share (above the lowest ``low`` x ``low`` frequencies, mean removed) and the
    neighbour / far cosine similarity of the patch embeddings."""
    grid = _grid(pos, side)[0]
    grid = grid - grid.mean(dim=(1, 2), keepdim=True)
    energy = torch.fft.fft2(grid).abs().pow(2).sum(0)
    freq = torch.fft.fftfreq(side) * side
    keep = (freq[:, None].abs() <= low // 2) & (freq[None, :].abs() <= low // 2)
    flat = F.normalize(grid.flatten(1).t(), dim=1)
    sim = flat @ flat.t()
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    dist = (ys.flatten()[:, None] - ys.flatten()[None]).abs() + (xs.flatten()[:, None] - xs.flatten()[None]).abs()
    return {"high_freq_share": float(energy[~keep].sum() / energy.sum()),
            "neighbour_cos": float(sim[dist == 1].mean()), "far_cos": float(sim[dist >= 3].mean())}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and image order")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    init = _model(args.input_size, dynamic=True).state_dict()
    side = args.input_size // MODEL["patch_size"]
    low = Curriculum.efficienttrain(args.epochs, args.input_size, MODEL["patch_size"]).input_size(0) // MODEL["patch_size"]
    results, final = {"init": describe(init["pos_embed"], side, low)}, {}
    for handling in ("fourier", "resize", "official"):
        final[handling], acc = train(handling, args.data_path, args.epochs, args.input_size, args.lr, init,
                                     args.seed)
        results[handling] = {"top1": acc, **describe(final[handling], side, low),
                             "moved": float((final[handling] - init["pos_embed"]).norm() / init["pos_embed"].norm())}
    for a, b in (("fourier", "official"), ("resize", "official"), ("fourier", "resize")):
        diff = (final[a] - final[b])[:, 1:].norm() / final[b][:, 1:].norm()
        results[f"{a}_vs_{b}_rel_l2"] = float(diff)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
