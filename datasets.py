"""Data sets and transforms for DeiT-style training.

Public API (plain values only):

- ``AugmentConfig`` and ``build_transform(is_train, aug)`` -> callable: PIL image -> float tensor [3, S, S].
- ``DataSpec`` and ``build_dataset(is_train, spec, transform)`` -> (dataset, nb_classes).
- ``DataError``: one-line error for bad data input (missing/empty path, missing CIFAR files, unknown set,
  corrupt image). The training entry turns it into exit code 2.
- ``skipped_images(dataset)`` / ``bad_images(dataset)``: images replaced because they could not be decoded
  (``DataSpec.skip_bad_images``), counted across DataLoader worker processes.
"""
from __future__ import annotations

import colorsys
import copy
import json
import multiprocessing as mp
import os
import pickle
import socket
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import ConcatDataset, Dataset, Subset, get_worker_info
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import InterpolationMode

from runtime.errors import DataError
from augment import new_data_aug_generator, posterize_any_bits, simple_random_crop

__all__ = [
    "DataError", "CorruptImageError", "DATA_SETS", "build_transform", "build_dataset", "skipped_images",
    "bad_images", "FakeDataset", "SafeImageFolder", "INatDataset", "load_cifar",
]

DEFAULT_AA = "rand-m9-mstd0.5-inc1"  # DeiT's --aa default
DATA_SETS = ("IMNET", "CIFAR10", "CIFAR100", "INAT18", "INAT19", "FOLDER", "FAKE")


class CorruptImageError(DataError):
    """An image file that cannot be read or decoded; the message names the file."""


# ------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation recipe (DeiT's flags): every field is required, so the command line's defaults are
    the only defaults. ``aa`` None or 'none' disables RandAugment; ``eval_crop_ratio`` is the share of the
    resized short side kept by the eval centre crop."""

    input_size: int
    aa: Optional[str]
    color_jitter: float
    train_interpolation: str
    reprob: float
    remode: str
    recount: int
    three_augment: bool
    simple_random_crop: bool
    eval_crop_ratio: float

    def with_train_stage(self, input_size: int, aa: Optional[str]) -> "AugmentConfig":
        """The same recipe at another training size and RandAugment policy (curriculum phases)."""
        return replace(self, input_size=int(input_size), aa=aa)


def _interp(name: str) -> InterpolationMode:
    name = (name or "bicubic").lower()
    if name == "random":  # timm's 'random' picks per call; for a fixed resize use bicubic
        name = "bicubic"
    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BICUBIC


def _patch_posterize(tf: Any) -> None:
    """Swap the posterize function inside timm RandAugment / AutoAugment / AugMix ops (see above)."""
    for t in getattr(tf, "transforms", [tf]):
        ops = list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:
            ops.extend(sub)
        for op in ops:
            if str(getattr(op, "name", "")).startswith("Posterize") and hasattr(op, "aug_fn"):
                op.aug_fn = posterize_any_bits


def auto_augment_policy(aa: Optional[str]) -> Optional[str]:
    """The --aa policy string, or None when it is empty or 'none'."""
    if aa is None or aa.strip().lower() in ("", "none"):
        return None
    return aa


def aa_with_magnitude(aa: Optional[str], magnitude: int) -> str:
    """A RandAugment policy string at another magnitude: 'rand-m9-mstd0.5-inc1', 3 -> 'rand-m3-mstd0.5-inc1'.
    A policy without an m field gains one; no policy at all means DeiT's default one at ``magnitude``."""
    policy = auto_augment_policy(aa) or DEFAULT_AA
    parts = policy.split("-")
    if parts[0] != "rand":
        raise DataError(f"a curriculum sets the RandAugment magnitude, so --aa must be a rand-... policy, got '{aa}'")
    kept = [p for p in parts[1:] if not (p.startswith("m") and p[1:].isdigit())]
    return "-".join(["rand", f"m{int(magnitude)}"] + kept)


def build_train_transform(aug: AugmentConfig) -> Callable:
    """DeiT training transform: PIL image -> normalised float tensor [3, S, S], S = ``aug.input_size``.

    timm ``create_transform`` (RandAugment, colour jitter, random erasing); for S <= 32 the random resized
    crop becomes resize + 4 px padded random crop; ``simple_random_crop`` swaps in DeiT III's simple crop;
    ``three_augment`` returns DeiT III's 3-Augment.
    """
    size = int(aug.input_size)
    if aug.three_augment:
        return new_data_aug_generator(size, aug.simple_random_crop, aug.color_jitter)
    aa = auto_augment_policy(aug.aa)
    if aug.remode.lower() not in ("pixel", "rand", "const"):
        raise DataError(f"--remode must be pixel, rand or const, got '{aug.remode}'")
    try:
        tf = create_transform(input_size=size, is_training=True, color_jitter=aug.color_jitter, auto_augment=aa,
                              interpolation=aug.train_interpolation, re_prob=float(aug.reprob),
                              re_mode=aug.remode, re_count=int(aug.recount))
    except (AssertionError, KeyError, ValueError) as e:  # timm validates with asserts / dict lookups
        raise DataError(f"bad augmentation setting (--aa '{aa}', --train-interpolation "
                        f"'{aug.train_interpolation}'): {type(e).__name__}: {e}") from None
    _patch_posterize(tf)
    if size <= 32:
        # a resized crop of a 32 px image keeps too little of it; pad-and-crop is the CIFAR standard
        tf.transforms[0] = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC),
                                      T.RandomCrop(size, padding=4)])
    elif aug.simple_random_crop:
        tf.transforms[0] = simple_random_crop(size, _interp(aug.train_interpolation))
    return tf


def build_eval_transform(input_size: int, eval_crop_ratio: float) -> Callable:
    """Resize the short side to int(S / eval_crop_ratio), centre-crop S, normalise; for S <= 32 the image
    is resized to S directly (no margin to crop away at CIFAR scale)."""
    size = int(input_size)
    bicubic = InterpolationMode.BICUBIC
    resize_to = size if size <= 32 else int(size / float(eval_crop_ratio))
    return T.Compose([T.Resize(resize_to, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def build_transform(is_train: bool, aug: AugmentConfig) -> Callable:
    """The train or eval transform of ``aug``."""
    return build_train_transform(aug) if is_train else build_eval_transform(aug.input_size, aug.eval_crop_ratio)


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
