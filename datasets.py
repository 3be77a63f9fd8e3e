"""Data sets for DeiT-style training: the entry DeiT users know (build_dataset, build_transform), the CIFAR,
iNaturalist and synthetic FAKE sets, and the factory.

Public API (plain values only):

- ``AugmentConfig`` and ``build_transform(is_train, aug)`` -> callable: PIL image -> float tensor [3, S, S]
  (defined in augment.py, with every transform of the PIL path).
- ``DataSpec`` and ``build_dataset(is_train, spec, transform)`` -> (dataset, nb_classes).
- ``DataError``: one-line error for bad data input (missing/empty path, missing CIFAR files, unknown set,
  corrupt image). The training entry turns it into exit code 2.
- ``skipped_images(dataset)`` / ``bad_images(dataset)``: images replaced because they could not be decoded
  (``DataSpec.skip_bad_images``), counted across DataLoader worker processes (defined in image_files.py, with
  ``SafeImageFolder``).
"""
from __future__ import annotations

import colorsys
import json
import os
import pickle
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.utils import check_integrity

from augment import (DEFAULT_AA, AugmentConfig, aa_with_magnitude, auto_augment_policy,  # noqa: F401  (the entry)
                     build_eval_transform, build_train_transform, build_transform)
from image_files import (_DECODE_ERRORS, CorruptImageError, SafeImageFolder, _image_folder,  # noqa: F401
                         _load_rgb, _SkipBadImages, bad_images, skipped_images)
from runtime.errors import DataError

__all__ = [
    "DataError", "CorruptImageError", "DATA_SETS", "build_transform", "build_dataset", "skipped_images",
    "bad_images", "FakeDataset", "SafeImageFolder", "INatDataset", "load_cifar",
]

DATA_SETS = ("IMNET", "CIFAR10", "CIFAR100", "INAT18", "INAT19", "FOLDER", "FAKE")


# ---------------------------------------------------------------------------------------------- CIFAR
class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches that are not the official release: only numpy arrays are rebuilt,
    so a crafted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _read_cifar_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as e:  # truncated, not a pickle, forbidden content
        raise DataError(f"unreadable CIFAR file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"unreadable CIFAR file {path}: expected a dict, got {type(obj).__name__}")
    # python-2 pickles may carry bytes keys
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_dir(root: str, cls: type) -> str:
    """Accept either the parent of ``cifar-10-batches-py`` (torchvision's root) or that folder itself."""
    if os.path.basename(os.path.normpath(root)) == cls.base_folder:
        return os.path.normpath(root)
    return os.path.join(root, cls.base_folder)


def _download_cifar(cls: type, root: str) -> None:
    """Fetch and extract the official archive into ``root`` (torchvision checks its md5)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # never hang forever on a blackholed network
    try:
        cls(root, train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def load_cifar(name: str, root: str, train: bool, transform: Optional[Callable] = None) -> tvd.CIFAR10:
    """CIFAR10 / CIFAR100 from ``root`` in torchvision's pickle layout, as a torchvision dataset.

    Files that match the official md5 sums are loaded by torchvision itself. Files that do not (a
    re-packed or self-made set) cannot pass torchvision's md5 check, so they are read here with a
    restricted unpickler and validated (uint8 [N, 3072] data, N labels in range, class names).
    When the split's files are missing, the official archive is downloaded; if that fails, DataError.
    """
    cls = {"CIFAR10": tvd.CIFAR10, "CIFAR100": tvd.CIFAR100}[name]
    folder = _cifar_dir(root, cls)
    parent = os.path.dirname(folder)
    split_files = [f for f, _ in (cls.train_list if train else cls.test_list)]
    needed = split_files + [cls.meta["filename"]]

    def missing() -> list[str]:
        return [f for f in needed if not os.path.isfile(os.path.join(folder, f))]

    if missing():
        lost = missing()
        try:
            _download_cifar(cls, parent)
            error = "the download did not provide them" if missing() else ""
        except Exception as e:  # no network, no write permission, bad archive...
            error = f"download failed ({type(e).__name__}: {' '.join(str(e).split())})"
        if error:
            raise DataError(f"{name} files not found in {folder} (missing {', '.join(lost)}) and {error}; "
                            f"put the extracted python version of {name} there")

    every = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
    if all(check_integrity(os.path.join(folder, f), md5) for f, md5 in every):
        return cls(parent, train=train, transform=transform, download=False)

    # not the official files: read and validate them ourselves
    datas, targets = [], []
    label_key = "labels" if name == "CIFAR10" else "fine_labels"
    for f in split_files:
        path = os.path.join(folder, f)
        entry = _read_cifar_pickle(path)
        data = np.asarray(entry.get("data"))
        labels = entry.get(label_key, entry.get("labels"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"bad CIFAR file {path}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
        if labels is None or len(labels) != len(data):
            raise DataError(f"bad CIFAR file {path}: need {len(data)} '{label_key}', got "
                            f"{'none' if labels is None else len(labels)}")
        datas.append(data)
        targets.extend(int(t) for t in labels)
    meta_path = os.path.join(folder, cls.meta["filename"])
    classes = _read_cifar_pickle(meta_path).get(cls.meta["key"])
    if not classes:
        raise DataError(f"bad CIFAR meta file {meta_path}: no '{cls.meta['key']}'")
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in classes]
    if targets and not (0 <= min(targets) and max(targets) < len(classes)):
        raise DataError(f"bad CIFAR files in {folder}: labels outside [0, {len(classes)})")

    ds = cls.__new__(cls)
    tvd.VisionDataset.__init__(ds, parent, transform=transform)
    ds.train = train
    ds.data = np.vstack(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # HWC like torchvision
    ds.targets = targets
    ds.classes = classes
    ds.class_to_idx = {c: i for i, c in enumerate(classes)}
    return ds


# --------------------------------------------------------------------------------------- iNaturalist
class INatDataset(_SkipBadImages, Dataset):
    """iNaturalist 2018 / 2019 in the official json layout.

    ``root`` holds ``train{year}.json``, ``val{year}.json`` (COCO-like: ``images`` with ``id`` and
    ``file_name`` relative to ``root``, ``annotations`` with ``image_id`` and ``category_id``) and
    optionally ``categories.json`` (list of dicts with ``id`` and taxonomy levels; falls back to the
    ``categories`` of the train json). ``category`` picks the level used as the label ('name' = species,
    or 'genus', 'family', 'order', 'class', 'phylum', 'kingdom', 'supercategory'). Labels are the sorted
    distinct values of that level over the *training* annotations, so train and val agree.
    """

    def __init__(self, root: str, train: bool = True, year: int = 2018, category: str = "name",
                 transform: Optional[Callable] = None, skip_bad_images: bool = False) -> None:
        self.root, self.transform, self.year, self.category = root, transform, year, category
        try:
            self._index(root, train, year, category)
        except (KeyError, TypeError, AttributeError) as e:  # a json without the expected fields
            raise DataError(f"malformed iNaturalist json in {root}: missing or bad field {e}") from None
        self.targets = [t for _, t in self.samples]
        self._init_skipping(skip_bad_images, len(self.samples))

    def _index(self, root: str, train: bool, year: int, category: str) -> None:
        train_json = self._read_json(os.path.join(root, f"train{year}.json"))
        split_json = train_json if train else self._read_json(os.path.join(root, f"val{year}.json"))

        cat_file = os.path.join(root, "categories.json")
        cats = self._read_json(cat_file) if os.path.isfile(cat_file) else train_json.get("categories")
        if not isinstance(cats, list) or not cats:
            raise DataError(f"no iNaturalist categories in {cat_file} nor in train{year}.json")
        cat_by_id = {int(c["id"]): c for c in cats}
        if category not in cats[0]:
            levels = sorted(k for k in cats[0] if k != "id")
            raise DataError(f"unknown iNaturalist category level '{category}'; choose one of {', '.join(levels)}")

        def level_of(cat_id: int, source: str) -> str:
            if cat_id not in cat_by_id:
                raise DataError(f"{source}: category id {cat_id} not in the category list")
            return str(cat_by_id[cat_id][category])

        train_values = sorted({level_of(int(a["category_id"]), "train") for a in train_json["annotations"]})
        self.classes = train_values
        self.class_to_idx = {v: i for i, v in enumerate(train_values)}

        files = {int(im["id"]): im["file_name"] for im in split_json["images"]}
        self.samples: list[tuple[str, int]] = []
        split = "train" if train else "val"
        for a in split_json["annotations"]:
            value = level_of(int(a["category_id"]), f"{split}{year}.json")
            if value not in self.class_to_idx:
                raise DataError(f"val{year}.json: class '{value}' has no training images")
            file_name = files.get(int(a["image_id"]))
            if file_name is None:
                raise DataError(f"{split}{year}.json: annotation for unknown image id {a['image_id']}")
            self.samples.append((os.path.join(root, file_name), self.class_to_idx[value]))
        if not self.samples:
            raise DataError(f"no images listed in {split}{year}.json")

    @staticmethod
    def _read_json(path: str) -> Any:
        if not os.path.isfile(path):
            raise DataError(f"iNaturalist file not found: {path}")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable json {path}: {e}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def _sample_path(self, index: int) -> str:
        return self.samples[index][0]

    def _load_sample(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return _load_rgb(path), target

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, target = self._get_checked(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


# ---------------------------------------------------------------------------------------------- FAKE
class FakeDataset(Dataset):
    """Deterministic synthetic images whose class is visible, for smoke tests and throughput runs.

    Class c has its own hue (classes spread around the colour wheel) and its own stripe orientation and
    frequency. Each image adds a random stripe phase, brightness, a small hue jitter and pixel noise, all
    drawn from a generator seeded by (seed, split, index): the same index always gives the same image and
    the train and val splits differ. Labels are balanced (index i of a seeded permutation gets i % C).
    Items are (PIL RGB image of ``image_size`` x ``image_size``, label) before ``transform``.
    """

    def __init__(self, size: int, num_classes: int, image_size: int, train: bool = True,
                 transform: Optional[Callable] = None, seed: int = 0) -> None:
        if size < 1 or num_classes < 1 or image_size < 1:
            raise DataError(f"FAKE data needs positive sizes, got size={size} classes={num_classes} "
                            f"image_size={image_size}")
        self.size, self.num_classes, self.image_size = int(size), int(num_classes), int(image_size)
        self.transform, self.seed, self.split = transform, int(seed), 0 if train else 1
        rng = np.random.default_rng([self.seed, self.split, 7])
        self.targets = (np.arange(self.size) % self.num_classes)[rng.permutation(self.size)].tolist()
        self.classes = [f"class_{c}" for c in range(self.num_classes)]
        # class signatures: golden-ratio hue steps keep consecutive class ids far apart in colour
        c = np.arange(self.num_classes)
        self._hue = (c * 0.6180339887) % 1.0
        self._angle = (c * 2.399963) % np.pi  # golden angle, folded to [0, pi)
        self._freq = 1.5 + (c % 3)  # stripes per image side

    def __len__(self) -> int:
        return self.size

    def image(self, index: int) -> Image.Image:
        """The untransformed PIL image of sample ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        c = self.targets[index]
        rng = np.random.default_rng([self.seed, self.split, 11, index])
        s = self.image_size
        hue = (self._hue[c] + rng.uniform(-0.15, 0.15) / max(self.num_classes, 4)) % 1.0
        rgb = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.85), dtype=np.float32)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        proj = xx * np.cos(self._angle[c]) + yy * np.sin(self._angle[c])
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * self._freq[c] * proj + rng.uniform(0, 2 * np.pi))
        shade = (0.55 + 0.45 * stripes) * rng.uniform(0.8, 1.15)
        img = shade[..., None] * rgb[None, None, :] * 255.0
        img += rng.normal(0.0, 18.0, size=(s, s, 3))
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# ------------------------------------------------------------------------------------------- factory
def _require_dir(path: Optional[str], data_set: str) -> str:
    if not path:
        raise DataError(f"--data-path is required for --data-set {data_set}")
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise DataError(f"data path does not exist or is not a folder: {path}")
    if not os.listdir(path):
        raise DataError(f"data path is empty: {path}")
    return path


@dataclass(frozen=True)
class DataSpec:
    """Which data set to read: ``name`` is one of DATA_SETS, ``path`` its root. ``fake_size`` and
    ``fake_classes`` size the synthetic FAKE set, whose images are ``fake_image_size`` px."""

    name: str
    path: Optional[str]
    skip_bad_images: bool
    inat_category: str = "name"
    fake_size: int = 1000
    fake_classes: int = 10
    fake_image_size: int = 224
    fake_seed: int = 0


def build_dataset(is_train: bool, spec: DataSpec, transform: Optional[Callable]) -> tuple[Dataset, int]:
    """The train or val split of ``spec`` with ``transform`` applied to each PIL image.

    Returns (dataset, nb_classes); items are (transform(image), int label). Raises DataError on bad input.
    """
    name = spec.name.upper()
    if name == "FAKE":
        n = spec.fake_size if is_train else max(1, spec.fake_size // 5)
        ds = FakeDataset(n, spec.fake_classes, spec.fake_image_size, train=is_train, transform=transform,
                         seed=spec.fake_seed)
        return ds, spec.fake_classes

    if name in ("CIFAR10", "CIFAR100"):
        if not spec.path:
            raise DataError(f"--data-path is required for --data-set {name}")
        ds = load_cifar(name, os.path.expanduser(spec.path), is_train, transform)
        return ds, len(ds.classes)

    if name in ("IMNET", "FOLDER"):
        root = _require_dir(spec.path, name)
        train_dir = os.path.join(root, "train")
        split_dir = train_dir if is_train else os.path.join(root, "val")
        class_root = train_dir if os.path.isdir(train_dir) else None
        ds = _image_folder(split_dir, transform, class_root, spec.skip_bad_images)
        return ds, len(ds.classes)

    if name in ("INAT18", "INAT19"):
        root = _require_dir(spec.path, name)
        ds = INatDataset(root, train=is_train, year=2018 if name == "INAT18" else 2019,
                         category=spec.inat_category, transform=transform, skip_bad_images=spec.skip_bad_images)
        return ds, len(ds.classes)

    raise DataError(f"unknown --data-set '{name}'; choose one of {', '.join(DATA_SETS)}")
