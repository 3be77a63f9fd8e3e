#!/usr/bin/env python
"""Generate token-labeling maps for an ImageFolder with any timm classifier (offline).

For every image ``<data>/<class>/<name>.<ext>`` it writes ``<output>/<class>/<name>.pt``: a float32 tensor
[2, K, S, S] with the teacher's raw (unnormalised) top-K logits (channel 0) and their class indices
(channel 1, as float) at every location of an S x S grid over the whole image: the published LV-ViT format
(K = 5, S = 14 by default), read by ``token_label`` as zero-filled logits (unlisted classes: logit 0).

How the dense logits are obtained (the classifier is applied per location):
  * CNN (``forward_features`` -> [B, C, h, w]): every location's feature vector goes through the model's own
    ``forward_head`` as a 1x1 feature map, i.e. the pooled head (norm + fc) applied per location; for a plain
    linear head this is the head's weights used as a 1x1 convolution.
  * ViT-like (``forward_features`` -> [B, P + M, C]): the P prefix tokens (CLS, distillation, registers)
    are dropped and ``forward_head`` is applied to every patch token (the token is presented in every
    sequence slot, so token pooling and average pooling both return it).
The h x w logit map is resized to S x S (bilinear, antialiased when shrinking) before the top-K.

The image is resized to --img-size x --img-size without cropping, so the map covers the full image as the
token-label dataset expects. Files already present are skipped (resume after a kill); each file is written
to a temporary name in the same folder and moved into place with os.replace.

Example:
    python scripts/generate_label.py --data /data/imagenet/train --output /data/imagenet/label_top5 \\
        --model resnet50 --checkpoint resnet50.pth --img-size 448 --label-size 14
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # for `import models` (this repository's LV-ViT) when run as a script

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr with exit code 2."""


def model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """--model-kwargs items -> timm.create_model keyword arguments (builders.parse_key_values)."""
    from training.builders import parse_key_values

    try:
        return parse_key_values(items)
    except ValueError as e:
        raise UsageError(str(e)) from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write token-labeling maps [2, K, S, S] for an ImageFolder.")
    p.add_argument("--data", required=True, help="ImageFolder root: <data>/<class>/<image>")
    p.add_argument("--output", required=True, help="label root: writes <output>/<class>/<image stem>.pt")
    p.add_argument("--model", required=True, help="timm model name (or one of this repository's models)")
    p.add_argument("--checkpoint", default=None, help="local state_dict / checkpoint (loaded weights_only)")
    p.add_argument("--random-init", action="store_true",
                   help="allow running without --checkpoint (random weights; for testing only)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs, values as Python literals (e.g. img_size=32)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: from the checkpoint's head, else the model default)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's input size)")
    p.add_argument("--label-size", type=int, default=14, help="side S of the written maps")
    p.add_argument("--topk", type=int, default=5, help="classes K kept per location")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="default: the model's pretrained_cfg")
    p.add_argument("--std", type=float, nargs=3, default=None, help="default: the model's pretrained_cfg")
    p.add_argument("--interpolation", default="bicubic", choices=["bilinear", "bicubic", "nearest"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-shards", type=int, default=1, help="split the images over this many processes")
    p.add_argument("--shard-id", type=int, default=0, help="which shard this process writes (0-based)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    return p.parse_args(argv)


# ---- model -------------------------------------------------------------------------------------------
def _load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated or not a weights-only file
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}")
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UsageError(f"checkpoint {path} holds no state_dict")
    clean = {}
    for k, v in ckpt.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    return clean


def _classifier_out(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    names = [names] if isinstance(names, str) else list(names or [])
    for name in names:
        w = state_dict.get(f"{name}.weight")
        if w is not None:
            return int(w.shape[0])
    return None


def build_teacher(args: argparse.Namespace) -> nn.Module:
    """Create the timm model, load the checkpoint strictly; eval mode."""
    import timm
    import models  # noqa: F401  (registers this repository's models)

    if args.checkpoint is None and not args.random_init:
        raise UsageError("--checkpoint is required (pass --random-init to run with random weights)")
    if not timm.is_model(args.model):
        raise UsageError(f"unknown model: {args.model}")
    kwargs = model_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except TypeError as e:
        raise UsageError(f"cannot build {args.model} with {kwargs}: {e}")
    if args.checkpoint is not None:
        sd = _load_state_dict(args.checkpoint)
        n = _classifier_out(model, sd)
        if args.num_classes is None and n is not None and n != getattr(model, "num_classes", n):
            model = timm.create_model(args.model, pretrained=False, **dict(kwargs, num_classes=n))
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UsageError(f"checkpoint {args.checkpoint} does not fit {args.model}: "
                             f"{' '.join(str(e).split())[:300]}")
    return model.eval()


@torch.no_grad()
def dense_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] -> per-location class logits [B, num_classes, h, w] (see module docstring)."""
    feats = model.forward_features(x)
    if isinstance(feats, (tuple, list)):
        feats = feats[0]
    b = feats.shape[0]
    if feats.dim() == 4:  # CNN feature map
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            _, h, w, c = feats.shape
            cells = feats.reshape(b * h * w, 1, 1, c)
        else:
            _, c, h, w = feats.shape
            cells = feats.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        logits = model.forward_head(cells)
    elif feats.dim() == 3:  # token sequence
        n, c = feats.shape[1:]
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        prefix = getattr(model, "num_prefix_tokens", None)
        if grid is not None and prefix is not None and int(grid[0]) * int(grid[1]) + prefix == n:
            h, w = int(grid[0]), int(grid[1])
        else:
            prefix = prefix if prefix is not None else 0
            side = int(round((n - prefix) ** 0.5))
            if side * side != n - prefix:
                raise RuntimeError(f"cannot infer the patch grid of {n} tokens with {prefix} prefix tokens")
            h = w = side
        tokens = feats[:, prefix:].reshape(b * h * w, 1, c)
        # Present each patch token in every slot: token pooling picks slot 0, avg pooling the patch slots.
        logits = model.forward_head(tokens.expand(-1, prefix + 1, -1).contiguous())
    else:
        raise RuntimeError(f"unsupported forward_features output shape {tuple(feats.shape)}")
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.reshape(b, h, w, -1).permute(0, 3, 1, 2).float()


def topk_maps(logits: torch.Tensor, label_size: int, k: int) -> torch.Tensor:
    """[B, C, h, w] logits -> [B, 2, k, S, S] (top-k logits, their class indices as float)."""
    if logits.shape[-2:] != (label_size, label_size):
        shrink = logits.shape[-1] > label_size or logits.shape[-2] > label_size
        logits = F.interpolate(logits, size=(label_size, label_size), mode="bilinear", align_corners=False,
                               antialias=shrink)
    vals, idx = logits.topk(min(k, logits.shape[1]), dim=1)
    return torch.stack([vals, idx.float()], dim=1)


# ---- data --------------------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    """(path list) -> (image tensor, position in the list); a bad image raises an error naming it."""

    def __init__(self, paths: List[str], transform: Any) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except Exception as e:
            raise RuntimeError(f"cannot read image {path}: {e}") from None
        return self.transform(img), i


def list_images(root: str) -> List[Tuple[str, str]]:
    """Sorted (image path, class dir) pairs of an ImageFolder tree."""
    if not os.path.isdir(root):
        raise UsageError(f"data path not found: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    items = []
    for c in classes:
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for fn in sorted(files):
                if fn.lower().endswith(IMG_EXTENSIONS):
                    items.append((os.path.join(dirpath, fn), c))
    if not items:
        raise UsageError(f"no images found under {root} (expected <root>/<class>/<image>)")
    return items


def output_path(out_root: str, image_path: str, cls: str) -> str:
    return os.path.join(out_root, cls, os.path.splitext(os.path.basename(image_path))[0] + ".pt")


def save_atomic(tensor: torch.Tensor, path: str) -> None:
    """torch.save to a temp file in the same folder, then os.replace: a kill never leaves a partial file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    torch.save(tensor, tmp)
    os.replace(tmp, path)


class _Progress:
    """tqdm when installed, else a line every ~10%."""

    def __init__(self, total: int, disable: bool) -> None:
        self.total, self.done, self.disable = total, 0, disable
        self.start = time.time()
        self.bar = None
        self.next_print = 0
        if not disable:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.disable:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_print or self.done == self.total:
            rate = self.done / max(time.time() - self.start, 1e-9)
            print(f"[generate_label] {self.done}/{self.total} images, {rate:.1f} img/s", flush=True)
            self.next_print = self.done + max(self.total // 10, 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from torchvision import transforms as T
    from timm.data.transforms import str_to_interp_mode

    if args.label_size < 1 or args.topk < 1 or args.batch_size < 1:
        raise UsageError("--label-size, --topk and --batch-size must be >= 1")
    if not (args.num_shards >= 1 and 0 <= args.shard_id < args.num_shards):
        raise UsageError(f"--shard-id must be in [0, {args.num_shards - 1}], got {args.shard_id}")
    items = list_images(args.data)[args.shard_id::args.num_shards]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_teacher(args).to(device)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    img_size = args.img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = args.mean or list(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = args.std or list(cfg.get("std", (0.229, 0.224, 0.225)))

    for c in sorted({c for _, c in items}):
        d = os.path.join(args.output, c)
        os.makedirs(d, exist_ok=True)
        for stale in glob.glob(os.path.join(d, ".*.pt.tmp*")):  # left by a killed run
            os.remove(stale)
    todo = [(p, c) for p, c in items if not os.path.exists(output_path(args.output, p, c))]
    print(f"[generate_label] {len(items)} images, {len(items) - len(todo)} already labelled, "
          f"{len(todo)} to do; model {args.model} at {img_size}px -> {args.topk} x {args.label_size}"
          f"x{args.label_size} maps on {device}", flush=True)
    if not todo:
        return 0
    tf = T.Compose([T.Resize((img_size, img_size), interpolation=str_to_interp_mode(args.interpolation)),
                    T.ToTensor(), T.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(_Images([p for p, _ in todo], tf), batch_size=args.batch_size,
                                         shuffle=False, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    bar = _Progress(len(todo), args.no_progress)
    with torch.inference_mode():
        for x, pos in loader:
            maps = topk_maps(dense_logits(model, x.to(device, non_blocking=True)), args.label_size,
                             args.topk).cpu()
            for m, i in zip(maps, pos.tolist()):
                path, cls = todo[i]
                save_atomic(m.clone(), output_path(args.output, path, cls))  # clone: save only this map
            bar.update(len(pos))
    bar.close()
    print(f"[generate_label] wrote {len(todo)} maps to {args.output}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"generate_label.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
