"""Image files read robustly: a decode error names the file (CorruptImageError) or, with
``DataSpec.skip_bad_images``, the sample is replaced by the next readable one and counted across DataLoader
worker processes (skipped_images, bad_images). SafeImageFolder is torchvision's ImageFolder read this way, with
a fixed class list; datasets.py builds the data sets from it."""
from __future__ import annotations

import copy
import multiprocessing as mp
import os
from typing import Any, Callable, Optional

from PIL import Image
from torch.utils.data import ConcatDataset, Subset, get_worker_info
from torchvision import datasets as tvd

from runtime.errors import DataError


class CorruptImageError(DataError):
    """An image file that cannot be read or decoded; the message names the file."""


# ------------------------------------------------------------------------------ robust image loading
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image (``convert`` forces decoding, so truncated files fail here)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class _SkipBadImages:
    """Mixin: decode errors either raise CorruptImageError(path) or, with skipping on, are replaced.

    The concrete class provides ``__len__``, ``_sample_path(i) -> str`` and ``_load_sample(i) -> (PIL, int)``.

    The replacement for a bad sample i is the next readable sample i+1, i+2, ... (mod n), so it is the
    same in every run. The counters live in shared memory created in the constructing (main) process, so
    increments made in forked or spawned DataLoader workers are visible to ``skipped_images``.
    """

    _SLOTS = 257  # counter slots: main process + DataLoader workers (ids wrap around beyond that)

    def _init_skipping(self, skip: bool, n: int) -> None:
        self.skip_bad_images = bool(skip)
        # Lock-free shared memory (a lock made under 'fork' cannot go to 'spawn' workers): each process
        # adds to its own slot, so there is no read-modify-write race; the total is the sum.
        self._skip_counter = mp.RawArray("q", self._SLOTS) if skip else None
        # one flag per sample: which files were found bad (for reporting their paths); writes are idempotent
        self._bad_flags = mp.RawArray("b", max(n, 1)) if skip else None

    def __deepcopy__(self, memo: dict) -> Any:
        # mmap-backed counters cannot be copied; a copy shares them (same files, same tally)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, v if k in ("_skip_counter", "_bad_flags") else copy.deepcopy(v, memo))
        return new

    def _get_checked(self, index: int) -> tuple[Image.Image, int]:
        n = len(self)  # type: ignore[arg-type]
        for step in range(n):
            i = (index + step) % n
            try:
                return self._load_sample(i)
            except _DECODE_ERRORS as e:
                path = self._sample_path(i)
                if not self.skip_bad_images:
                    raise CorruptImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
                info = get_worker_info()
                slot = 0 if info is None else 1 + info.id % (self._SLOTS - 1)
                self._skip_counter[slot] += 1
                self._bad_flags[i] = 1
        raise DataError(f"no readable image in data set ({n} files tried)")


def skipped_images(dataset: Any) -> int:
    """How many times a bad image has been replaced so far (all processes; 0 when skipping is off)."""
    if isinstance(dataset, ConcatDataset):
        return sum(skipped_images(d) for d in dataset.datasets)
    if isinstance(dataset, Subset):
        return skipped_images(dataset.dataset)
    counter = getattr(dataset, "_skip_counter", None)
    return int(sum(counter)) if counter is not None else 0


def bad_images(dataset: Any) -> list[str]:
    """Paths of the distinct files found unreadable so far (all processes; empty when skipping is off)."""
    if isinstance(dataset, ConcatDataset):
        return [p for d in dataset.datasets for p in bad_images(d)]
    if isinstance(dataset, Subset):
        return bad_images(dataset.dataset)
    flags = getattr(dataset, "_bad_flags", None)
    if flags is None:
        return []
    return [dataset._sample_path(i) for i in range(len(dataset)) if flags[i]]


# ---------------------------------------------------------------------------------------- ImageFolder
class SafeImageFolder(_SkipBadImages, tvd.ImageFolder):
    """torchvision ImageFolder with file-naming decode errors, optional skipping, and a fixed class list.

    ``class_root``: folder whose sub-folders define the classes (normally ``<data>/train``), so that a
    val/ tree with a missing class folder still gets the training label indices.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, class_root: Optional[str] = None,
                 skip_bad_images: bool = False) -> None:
        self._class_root = class_root
        # a val/ tree may lack some training classes: those are simply absent, not an error
        allow_empty = bool(class_root) and os.path.abspath(class_root) != os.path.abspath(root)
        super().__init__(root, transform=transform, loader=_load_rgb, allow_empty=allow_empty)
        self._init_skipping(skip_bad_images, len(self.samples))

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(self._class_root or directory)
        if self._class_root and os.path.abspath(self._class_root) != os.path.abspath(directory):
            extra = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name not in classes)
            if extra:
                raise DataError(f"{directory} has class folders not in {self._class_root}: {', '.join(extra[:5])}")
        return classes, {c: i for i, c in enumerate(classes)}

    def _sample_path(self, index: int) -> str:
        return self.samples[index][0]

    def _load_sample(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return self.loader(path), target

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, target = self._get_checked(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def _image_folder(split_dir: str, transform: Callable, class_root: Optional[str], skip: bool) -> SafeImageFolder:
    if not os.path.isdir(split_dir):
        raise DataError(f"data folder not found: {split_dir}")
    # the class list is read from class_root first: when it is empty, that is the folder to name
    if class_root and not any(entry.is_dir() for entry in os.scandir(class_root)):
        raise DataError(f"empty image folder {class_root} (expected <class>/<image> inside)")
    try:
        ds = SafeImageFolder(split_dir, transform=transform, class_root=class_root, skip_bad_images=skip)
    except FileNotFoundError as e:  # torchvision: no class folder / no valid image file
        raise DataError(f"empty image folder {split_dir} (expected <class>/<image> inside): {e}") from None
    if len(ds) == 0:
        raise DataError(f"empty image folder {split_dir} (expected <class>/<image> inside)")
    return ds
