"""Train a small torchvision VisionTransformer with ToE in a plain PyTorch loop, on FAKE random images.

Offline and config-only (no weights are downloaded). From the repository root (or after `pip install .`):

    PYTHONPATH=. python examples/train_torchvision_vit.py --epochs 3

Each epoch prints the stage's keep rate and how many tokens enter block ``--layer`` during training.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torchvision

import toe


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse(argv=None) -> argparse.Namespace:
    parser = Parser(prog="train_torchvision_vit.py", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--r1", type=float, default=0.5, help="keep rate of stage 1")
    parser.add_argument("--ng", type=int, default=3, help="number of stages")
    parser.add_argument("--layer", type=int, default=1, help="block whose input ToE reduces")
    parser.add_argument("--images", type=int, default=64, help="size of the fake training set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1:
        parser.error("--images and --batch-size must be >= 1")
    return args


def fake_loader(images: int, batch_size: int, classes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(images, 3, 32, 32, generator=generator),
                                          torch.randint(0, classes, (images,), generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)


def main(argv=None) -> int:
    args = parse(argv)
    torch.manual_seed(args.seed)
    # 32 px, patch 4: 64 patch tokens + 1 class token
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    try:
        schedule = toe.Schedule(r1=args.r1, ng=args.ng, k=2, epochs=args.epochs)
        toe.apply(model, schedule, layer=args.layer)
    except ValueError as error:
        print(f"train_torchvision_vit.py: error: {error}", file=sys.stderr)
        return 2
    seen = []  # token counts entering the patched block (registered after ToE's hook, so it sees the reduction)
    model.encoder.layers[args.layer].register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].shape[1]))
    loader = fake_loader(args.images, args.batch_size, 10, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        toe.set_epoch(model, epoch)
        model.train()
        seen.clear()
        total = 0.0
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
        print(f"epoch {epoch}: keep rate {toe.current_rates(model)[-1]:.2f}, {max(seen)} of {model.seq_length} "
              f"tokens enter block {args.layer}, loss {total / args.images:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
