"""Train a small Hugging Face transformers ViTForImageClassification with ToE under the HF Trainer, on FAKE
random images; toe.integrations.hf.ToECallback moves ToE to each epoch's stage.

Offline and config-only (no weights or datasets are downloaded). Needs `pip install .[hf]`
(transformers + accelerate). From the repository root:

    PYTHONPATH=. python examples/train_hf_vit.py --epochs 3

Each epoch prints the stage's keep rate and how many tokens the last training step kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import toe


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse(argv=None) -> argparse.Namespace:
    parser = Parser(prog="train_hf_vit.py", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--r1", type=float, default=0.5, help="keep rate of stage 1")
    parser.add_argument("--ng", type=int, default=3, help="number of stages")
    parser.add_argument("--layer", type=int, default=1, help="layer whose input ToE reduces")
    parser.add_argument("--images", type=int, default=64, help="size of the fake training set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1:
        parser.error("--images and --batch-size must be >= 1")
    return args


class FakeImages(torch.utils.data.Dataset):
    """Random 32 px images with random labels, as the dicts the Trainer passes to the model."""

    def __init__(self, images: int, classes: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(images, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, classes, (images,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def build(args: argparse.Namespace, transformers):
    """The ToE-patched model; ValueError for a bad schedule or layer."""
    torch.manual_seed(args.seed)
    # 32 px, patch 4: 64 patch tokens + 1 class token
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    toe.apply(model, toe.Schedule(r1=args.r1, ng=args.ng, k=2, epochs=args.epochs), layer=args.layer)
    return model


def train(args: argparse.Namespace, model, transformers, ToECallback) -> None:
    callback = ToECallback()
    full = model.vit.embeddings.patch_embeddings.num_patches + 1

    class PrintTokens(transformers.TrainerCallback):
        def on_epoch_end(self, targs, state, control, **kwargs):
            kept = toe.last_index(model)  # None when ToE kept every token
            tokens = full if kept is None else kept.shape[1]
            print(f"epoch {callback.epochs[-1]}: keep rate {toe.current_rates(model)[-1]:.2f}, {tokens} of {full} "
                  f"tokens enter layer {args.layer}", flush=True)

    with tempfile.TemporaryDirectory() as out:  # the Trainer wants a folder; this run saves nothing
        targs = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            eval_strategy="no", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
            seed=args.seed)
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=FakeImages(args.images, 10, args.seed),
                                       callbacks=[callback, PrintTokens()])
        result = trainer.train()
    print(f"done: {args.epochs} epochs, training loss {result.training_loss:.4f}")


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub
    try:
        import transformers
        from toe.integrations.hf import ToECallback
    except ImportError as error:
        print(f"train_hf_vit.py: error: {error}", file=sys.stderr)
        return 2
    try:
        model = build(args, transformers)
    except ValueError as error:  # schedule or layer out of range
        print(f"train_hf_vit.py: error: {error}", file=sys.stderr)
        return 2
    train(args, model, transformers, ToECallback)
    return 0


if __name__ == "__main__":
    sys.exit(main())
