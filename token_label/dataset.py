"""Token-labeling data sets: an image folder with a label map per image, and synthetic maps.

Bad data (``errors.DataError``, one line naming the file): an unreadable image or label map, a label map of
the wrong shape or with bad class indices, or a class folder missing under the label root. With
``skip_bad_images`` an unreadable image or label map is replaced by the next readable sample and counted
(``datasets.skipped_images`` / ``bad_images``); a missing class folder is always an error (wrong label set).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from PIL import Image

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from datasets import SafeImageFolder
from runtime.errors import DataError
from token_label.augment import TokenLabelTransform
from token_label.maps import LabelMapError, label_path_for, load_label_map


class TokenLabelImageFolder(SafeImageFolder):
    """Image folder whose items are ``(image, (class index, *label tensors))``.

    The label map of ``<root>/<class>/<name>.<ext>`` is ``<label_root>/<class>/<name>.pt``. ``transform`` is
    a joint (img, label_map, class_index) -> (image, label tensors) transform such as
    :class:`TokenLabelTransform`; None gives the PIL image and the raw map [2, K, H, W]. Bad input raises
    ``errors.DataError`` naming the file, or with ``skip_bad_images`` is replaced and counted (module docstring).
    """

    def __init__(self, root: str, label_root: str, transform: Optional[Callable[..., Any]] = None, *,
                 skip_bad_images: bool = False) -> None:
        for what, path in (("image", root), ("token label", label_root)):
            if not os.path.isdir(path):
                raise DataError(f"{what} folder not found: {path}")
        try:
            super().__init__(root, transform=None, skip_bad_images=skip_bad_images)
        except FileNotFoundError as e:  # torchvision: no class folder / no image file
            raise DataError(f"empty image folder {root} (expected <class>/<image> inside): {e}") from None
        missing = [c for c in self.classes if not os.path.isdir(os.path.join(label_root, c))]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"token label folder missing for class {missing[0]!r}: "
                            f"{os.path.join(label_root, missing[0])}{more}")
        self.label_root = label_root
        self.joint_transform = transform

    def _load_sample(self, index: int) -> Tuple[Image.Image, Tuple[int, torch.Tensor]]:
        path, class_index = self.samples[index]
        img = self.loader(path)
        label_map = load_label_map(label_path_for(path, self.label_root), len(self.classes))
        return img, (class_index, label_map)

    def __getitem__(self, index: int) -> Tuple[Any, Tuple[Any, ...]]:
        try:
            img, (class_index, label_map) = self._get_checked(index)
        except DataError as e:
            # the retry loop words every failure as an image one; a label-map failure has its own message
            if isinstance(e.__context__, LabelMapError):
                raise DataError(str(e.__context__)) from None
            raise
        if self.joint_transform is None:
            return img, (class_index, label_map)
        x, labels = self.joint_transform(img, label_map, class_index)
        return x, (class_index, *labels)


class SyntheticTokenLabels(torch.utils.data.Dataset):
    """Wrap an (image, class index) data set with deterministic synthetic label maps, for smoke tests and
    throughput runs without a label set (e.g. ``--data-set FAKE --token-label``).

    Item i: (image, (class index, map [2, k, S, S])) in the file format (raw logits): the image class is
    top-1 at every location (logit 2 + noise), the other k - 1 slots hold other classes with lower logits;
    the noise depends only on (seed, i). The map is not augmented.
    """

    def __init__(self, dataset: Any, num_classes: int, label_size: int = 14, k: int = 5, seed: int = 0) -> None:
        if num_classes < 1 or label_size < 1 or k < 1:
            raise ValueError("num_classes, label_size and k must be >= 1")
        self.dataset = dataset
        self.num_classes = num_classes
        self.label_size = label_size
        self.k = min(k, num_classes)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, Tuple[int, torch.Tensor]]:
        img, class_index = self.dataset[index]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s, k, c = self.label_size, self.k, self.num_classes
        # other classes: distinct random offsets from the image class at each location
        offs = torch.stack([torch.randperm(c - 1, generator=g)[:k - 1] + 1 for _ in range(s * s)]) \
            if k > 1 else torch.zeros(s * s, 0, dtype=torch.long)
        idx = torch.cat([torch.zeros(s * s, 1, dtype=torch.long), offs], 1)
        idx = (idx + int(class_index)) % c
        logits = torch.randn(s * s, k, generator=g) * 0.5 - torch.arange(k, dtype=torch.float32)
        logits[:, 0] += 2.0
        m = torch.stack([logits.T.reshape(k, s, s), idx.T.reshape(k, s, s).float()])
        return img, (int(class_index), m)


def build_token_label_dataset(root: str, label_root: str, input_size: int, label_size: int, *,
                              aa: Optional[str], color_jitter: Optional[float], interpolation: str,
                              re_prob: float, re_mode: str, re_count: int, target: str,
                              skip_bad_images: bool = False, scale: Tuple[float, float] = (0.08, 1.0),
                              ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5,
                              mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> TokenLabelImageFolder:
    """Token-labeling training set: image folder ``root`` with label maps under ``label_root``.

    The augmentation values come from the caller (the command line); none is defaulted here. ``aa`` None,
    '' or 'none' turns RandAugment off (colour jitter is used then). Items: (image [3, input_size,
    input_size], (class index, *label tensors)) as described by :class:`TokenLabelTransform`.
    Raises ``errors.DataError`` for bad data, ValueError for a bad ``aa`` / ``target``.
    """
    tf = TokenLabelTransform(input_size, label_size, auto_augment=aa, color_jitter=color_jitter,
                             interpolation=interpolation, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                             target=target, scale=scale, ratio=ratio, hflip=hflip, mean=mean, std=std)
    return TokenLabelImageFolder(root, label_root, tf, skip_bad_images=skip_bad_images)
