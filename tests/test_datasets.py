"""Data sets, transforms and bad-input handling (datasets.py, augment.py, image_files.py). All data is written
by the tests."""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pickle
import random
import sys
import zlib
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets as tvd
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets as D  # noqa: E402
from augment import new_data_aug_generator, posterize_any_bits  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# DeiT's recipe as the training entry's flags give it (main.py defaults)
DEIT_AUG = dict(input_size=224, aa="rand-m9-mstd0.5-inc1", color_jitter=0.3, train_interpolation="bicubic",
                reprob=0.25, remode="pixel", recount=1, three_augment=False, simple_random_crop=False,
                eval_crop_ratio=0.875)
_FLAG_TO_AUG = {"ThreeAugment": "three_augment", "src": "simple_random_crop"}


def ns(**kw) -> argparse.Namespace:
    """Flag-named settings, as the tests below write them."""
    return argparse.Namespace(**kw)


def aug_of(a: argparse.Namespace) -> "D.AugmentConfig":
    values = dict(DEIT_AUG)
    for key, value in vars(a).items():
        key = _FLAG_TO_AUG.get(key, key)
        if key in values:
            values[key] = value
    return D.AugmentConfig(**values)


def spec_of(a: argparse.Namespace) -> "D.DataSpec":
    v = vars(a)
    return D.DataSpec(name=v.get("data_set", "IMNET"), path=v.get("data_path"),
                      skip_bad_images=v.get("skip_bad_images", False), inat_category=v.get("inat_category", "name"),
                      fake_size=v.get("fake_size", 1000), fake_classes=v.get("nb_classes", 10),
                      fake_image_size=v.get("input_size", 224))


def build_dataset(is_train: bool, a: argparse.Namespace):
    return D.build_dataset(is_train, spec_of(a), D.build_transform(is_train, aug_of(a)))


def build_transform(is_train: bool, a: argparse.Namespace):
    return D.build_transform(is_train, aug_of(a))


def to_tensor() -> T.Compose:
    return T.Compose([T.ToTensor()])


# ------------------------------------------------------------------------------------------------ FAKE
def test_fake_is_deterministic_split_dependent_and_balanced():
    a = ns(data_set="FAKE", input_size=32)  # fake_size / nb_classes take their defaults
    tr1, nb = build_dataset(True, a)
    tr2, _ = build_dataset(True, a)
    va, nb_va = build_dataset(False, a)
    assert (nb, nb_va, len(tr1), len(va)) == (10, 10, 1000, 200)
    for i in (0, 17, 999):
        assert np.array_equal(np.asarray(tr1.image(i)), np.asarray(tr2.image(i)))
        assert tr1.targets[i] == tr2.targets[i]
    # the same index in train and val is a different image
    assert not np.array_equal(np.asarray(tr1.image(3)), np.asarray(va.image(3)))
    assert np.bincount(tr1.targets, minlength=10).tolist() == [100] * 10
    x, y = tr1[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10

    small, nb7 = build_dataset(True, ns(data_set="FAKE", input_size=24, fake_size=50, nb_classes=7))
    small_val, _ = build_dataset(False, ns(data_set="FAKE", input_size=24, fake_size=50, nb_classes=7))
    assert (nb7, len(small), len(small_val)) == (7, 50, 10)
    assert small.image(0).size == (24, 24) and max(small.targets) == 6


def test_fake_class_is_visible_in_raw_pixels():
    # independent of any model: a nearest class-mean classifier on raw pixels must work on val
    a = ns(data_set="FAKE", input_size=16, fake_size=400)
    tr, nb = build_dataset(True, a)
    va, _ = build_dataset(False, a)
    feats = lambda ds: np.stack([np.asarray(ds.image(i), np.float32).mean((0, 1)) for i in range(len(ds))])
    xt, xv = feats(tr), feats(va)
    means = np.stack([xt[np.array(tr.targets) == c].mean(0) for c in range(nb)])
    pred = ((xv[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == np.array(va.targets)).mean() > 0.9


def test_fake_is_learnable_by_tiny_vit_with_deit_augmentation():
    import timm

    torch.manual_seed(0)
    random.seed(0)  # RandAugment draws its ops from numpy and its magnitudes from python's random
    np.random.seed(0)
    a = ns(data_set="FAKE", input_size=32, fake_size=320, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    tr, nb = build_dataset(True, a)
    va, _ = build_dataset(False, a)
    model = timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                          num_classes=nb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        model.train()
        for x, y in DataLoader(tr, batch_size=32, shuffle=True, generator=g):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in DataLoader(va, batch_size=96))
    # chance is 0.1 (a class-mean classifier on raw pixels gets > 0.9); this seeded run measures 0.78
    assert correct / len(va) > 0.65


# ------------------------------------------------------------------------------------------ transforms
def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("extra", [
    {}, {"aa": "none"}, {"src": True}, {"ThreeAugment": True}, {"ThreeAugment": True, "src": True},
    {"color_jitter": 0.0, "reprob": 0.0},
])
def test_transform_output_shapes(size, extra):
    a = ns(input_size=size, **extra)
    for is_train in (True, False):
        tf = build_transform(is_train, a)
        for img in (_rgb(70, 50), _rgb(32, 32, 1), _rgb(20, 40, 2)):
            x = tf(img)
            assert x.shape == (3, size, size) and x.dtype == torch.float32


def test_transform_structure():
    def names(tf):
        return [type(t).__name__ for t in tf.transforms]

    dflt = build_transform(True, ns(input_size=48))
    assert names(dflt)[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names(dflt)
    assert "RandomErasing" in names(dflt)
    assert "RandAugment" not in names(build_transform(True, ns(input_size=48, aa="none")))
    assert "RandAugment" not in names(build_transform(True, ns(input_size=48, aa=None)))
    # 32 px: the resized crop becomes resize + random crop with 4 px padding
    first = build_transform(True, ns(input_size=32)).transforms[0]
    assert [type(t).__name__ for t in first.transforms] == ["Resize", "RandomCrop"] and first.transforms[1].padding == 4
    src = build_transform(True, ns(input_size=48, src=True)).transforms[0]
    assert [type(t).__name__ for t in src.transforms] == ["Resize", "RandomCrop"]
    three = build_transform(True, ns(input_size=48, ThreeAugment=True))
    assert names(three)[:3] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomChoice"]
    choice = three.transforms[2].transforms
    assert sorted(type(t).__name__ for t in choice) == ["GaussianBlur", "RandomGrayscale", "RandomSolarize"]
    assert names(new_data_aug_generator(48, True, 0.3))[:2] == ["Resize", "RandomCrop"]
    assert "ColorJitter" not in names(new_data_aug_generator(48, False, 0.0))


def test_three_augment_applies_exactly_one_of_its_three_ops():
    img = _rgb(32, 32, 3)
    one_of = new_data_aug_generator(40, False, 0.3).transforms[2]
    random.seed(0)  # RandomChoice draws from python's random
    torch.manual_seed(0)
    gray = solar = other = 0
    for _ in range(30):
        out = np.asarray(one_of(img)).astype(int)
        if (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all():
            gray += 1
        elif np.array_equal(out, np.where(np.asarray(img) >= 128, 255 - np.asarray(img), np.asarray(img))):
            solar += 1
        else:
            other += 1  # blur: neither gray nor solarized
    assert gray >= 3 and solar >= 3 and other >= 3


def test_eval_transform_matches_timm_reference():
    from timm.data.transforms_factory import transforms_imagenet_eval

    img = _rgb(90, 70, 4)
    ours = build_transform(False, ns(input_size=48, eval_crop_ratio=0.875))(img)
    ref = transforms_imagenet_eval(img_size=48, crop_pct=0.875, interpolation="bicubic")(img)
    assert torch.allclose(ours, ref, atol=1e-6)
    # 32 px: square images are resized directly to 32 x 32
    sq = _rgb(40, 40, 5)
    direct = (T.ToTensor()(sq.resize((32, 32), Image.BICUBIC)) - MEAN) / STD
    assert torch.allclose(build_transform(False, ns(input_size=32))(sq), direct, atol=2e-2)


@pytest.mark.parametrize("bits", [0, 1, 3, 4])
def test_posterize_behaves_like_pillow_12(bits):
    # Pillow >= 13 rejects bits=0, which RandAugment's PosterizeIncreasing requests at magnitude 10
    img = _rgb(16, 16, 6)
    out = np.asarray(posterize_any_bits(img, bits))
    ref = np.asarray(img) & np.uint8((~(2 ** (8 - bits) - 1)) & 0xFF)
    assert np.array_equal(out, ref)
    tf = build_transform(True, ns(input_size=32))
    ops = [op for op in tf.transforms[2].ops if op.name.startswith("Posterize")]
    assert ops and all(op.aug_fn is posterize_any_bits for op in ops)


# ----------------------------------------------------------------------------------------- ImageFolder
def _write_tree(root: Path, spec: dict[str, dict[str, int]]) -> None:
    for split, classes in spec.items():
        for c, n in classes.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _rgb(12, 10, zlib.crc32(f"{split}/{c}/{i}".encode())).save(d / f"{i}.png")


def test_image_folder_classes_come_from_train(tmp_path):
    _write_tree(tmp_path, {"train": {"ant": 2, "bee": 3, "cat": 1}, "val": {"ant": 1, "cat": 2}})
    for name in ("FOLDER", "IMNET"):
        a = ns(data_set=name, data_path=str(tmp_path), input_size=16)
        tr, nb = build_dataset(True, a)
        va, nb_val = build_dataset(False, a)
        assert (nb, nb_val, len(tr), len(va)) == (3, 3, 6, 3)
        assert sorted(tr.targets) == [0, 0, 1, 1, 1, 2]
        # val has no 'bee' folder, yet 'cat' keeps the training index 2
        assert sorted(va.targets) == [0, 2, 2]
        x, y = va[0]
        assert x.shape == (3, 16, 16)


@pytest.mark.parametrize("setup, needle", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "empty"),
    (lambda p: (p / "other").mkdir(parents=True), "not found"),
    (lambda p: (p / "train" / "a").mkdir(parents=True), "empty"),
])
def test_missing_or_empty_folder_paths(tmp_path, setup, needle):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(D.DataError, match=needle) as e:
        build_dataset(True, ns(data_set="FOLDER", data_path=str(root), input_size=16))
    assert "\n" not in str(e.value)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(D.DataError, match="unknown --data-set 'NOPE'"):
        build_dataset(True, ns(data_set="NOPE", data_path=str(tmp_path)))
    with pytest.raises(D.DataError, match="--data-path is required"):
        build_dataset(True, ns(data_set="IMNET"))
    for bad in ({"aa": "rand-x9"}, {"aa": "foo"}, {"train_interpolation": "nope"}, {"remode": "weird"}):
        with pytest.raises(D.DataError, match="--"):
            build_dataset(True, ns(data_set="FAKE", fake_size=5, input_size=16, **bad))
    with pytest.raises(D.DataError, match="positive"):
        build_dataset(True, ns(data_set="FAKE", fake_size=0))
    assert issubclass(D.DataError, ValueError) and issubclass(D.CorruptImageError, D.DataError)


# ------------------------------------------------------------------------------------- corrupt images
def _corrupt_tree(root: Path) -> list[str]:
    """6 training images in 2 classes; a/1.jpg is truncated and b/0.png is not an image at all."""
    _write_tree(root, {"train": {"a": 3, "b": 3}})
    trunc = root / "train" / "a" / "1.jpg"
    _rgb(40, 40, 9).save(trunc, quality=95)
    (root / "train" / "a" / "1.png").unlink()
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    junk = root / "train" / "b" / "0.png"
    junk.write_bytes(b"this is not a png")
    return [str(trunc), str(junk)]


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = _corrupt_tree(tmp_path)
    ds, _ = build_dataset(True, ns(data_set="FOLDER", data_path=str(tmp_path), input_size=16))
    idx = {p: i for i, (p, _) in enumerate(ds.samples)}
    for p in bad:
        with pytest.raises(D.CorruptImageError) as e:
            ds[idx[p]]
        assert p in str(e.value) and "\n" not in str(e.value)
    # through worker processes the message is still one line naming the file
    with pytest.raises(D.DataError) as e:
        list(DataLoader(ds, batch_size=2, num_workers=2))
    msg = str(e.value)
    assert "\n" not in msg and any(p in msg for p in bad) and "Traceback" in e.value.detail


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_counts_across_workers(tmp_path, workers):
    bad = _corrupt_tree(tmp_path)
    ds, _ = build_dataset(True, ns(data_set="FOLDER", data_path=str(tmp_path), input_size=16,
                                     skip_bad_images=True, ThreeAugment=False))
    ds.transform = to_tensor()  # deterministic, to compare replacements
    assert D.skipped_images(ds) == 0
    batches = list(DataLoader(ds, batch_size=2, num_workers=workers))
    assert sum(len(y) for _, y in batches) == len(ds) == 6
    assert D.skipped_images(ds) == 2
    assert sorted(D.bad_images(ds)) == sorted(bad)
    # a bad sample is replaced by the next readable one (deterministic)
    paths = [p for p, _ in ds.samples]
    for p in bad:
        i = paths.index(p)
        j = (i + 1) % len(ds)
        while paths[j] in bad:
            j = (j + 1) % len(ds)
        x_bad, y_bad = ds[i]
        x_ref, y_ref = ds[j]
        assert torch.equal(x_bad, x_ref) and y_bad == y_ref
    assert D.skipped_images(ds) == 4 and D.skipped_images(torch.utils.data.Subset(ds, [0])) == 4
    twin = copy.deepcopy(ds)  # a copy shares the tally
    twin[paths.index(bad[0])]
    assert D.skipped_images(ds) == D.skipped_images(twin) == 5
    fake, _ = build_dataset(True, ns(data_set="FAKE", fake_size=10, input_size=8))
    assert D.skipped_images(fake) == 0 and D.bad_images(fake) == []


# ---------------------------------------------------------------------------------------------- CIFAR
def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar(root: Path, name: str, n_per_file: int = 6) -> dict[str, np.ndarray]:
    """Write a tiny set in torchvision's CIFAR pickle layout; returns the expected HWC images and labels."""
    cls = {"CIFAR10": tvd.CIFAR10, "CIFAR100": tvd.CIFAR100}[name]
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    nc = 10 if name == "CIFAR10" else 100
    out = {}
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        imgs, labels = [], []
        for f, _ in files:
            data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
            lab = rng.integers(0, nc, n_per_file).tolist()
            entry = {"batch_label": f, "data": data, "filenames": [f"{f}_{i}.png" for i in range(n_per_file)]}
            if name == "CIFAR10":
                entry["labels"] = lab
            else:
                entry.update(fine_labels=lab, coarse_labels=[v // 5 for v in lab])
            _dump(folder / f, entry)
            imgs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += lab
        out[split] = (np.concatenate(imgs), labels)
    if name == "CIFAR10":
        _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    else:
        _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                "coarse_label_names": [f"k{i}" for i in range(20)]})
    return out


@pytest.mark.parametrize("name, nc, n_train", [("CIFAR10", 10, 30), ("CIFAR100", 100, 6)])
def test_cifar_from_files_written_in_torchvision_format(tmp_path, name, nc, n_train):
    expected = _write_cifar(tmp_path, name)
    cls = {"CIFAR10": tvd.CIFAR10, "CIFAR100": tvd.CIFAR100}[name]
    # these files cannot match the official md5 sums, so torchvision alone refuses them
    with pytest.raises(RuntimeError, match="corrupted"):
        cls(str(tmp_path), train=True)
    for is_train, split in ((True, "train"), (False, "test")):
        ds, nb = build_dataset(is_train, ns(data_set=name, data_path=str(tmp_path), input_size=32))
        assert isinstance(ds, cls) and nb == nc
        imgs, labels = expected[split]
        assert len(ds) == len(imgs) == (n_train if is_train else 6)
        assert ds.targets == labels
        ds.transform = None
        for i in (0, len(ds) - 1):
            img, y = ds[i]
            assert np.array_equal(np.asarray(img), imgs[i]) and y == labels[i]
        ds.transform = build_transform(is_train, ns(input_size=32))
        assert ds[0][0].shape == (3, 32, 32)
    # data_path may also point at the extracted folder itself
    ds, _ = build_dataset(False, ns(data_set=name, data_path=str(tmp_path / cls.base_folder), input_size=32))
    assert len(ds) == 6


def test_cifar_official_files_go_through_torchvision(tmp_path, monkeypatch):
    # pretend our files are the official release by giving torchvision their md5 sums
    _write_cifar(tmp_path, "CIFAR10")
    folder = tmp_path / tvd.CIFAR10.base_folder
    md5 = lambda f: hashlib.md5((folder / f).read_bytes()).hexdigest()
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f, md5(f)] for f, _ in tvd.CIFAR10.train_list])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [[f, md5(f)] for f, _ in tvd.CIFAR10.test_list])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5("batches.meta")})
    via_tv = D.load_cifar("CIFAR10", str(tmp_path), True)
    monkeypatch.setattr(D, "check_integrity", lambda *a, **k: False)  # force our reader
    ours = D.load_cifar("CIFAR10", str(tmp_path), True)
    assert np.array_equal(via_tv.data, ours.data) and via_tv.targets == ours.targets
    assert via_tv.classes == ours.classes


def test_cifar_missing_and_not_downloadable(tmp_path, monkeypatch):
    calls = []

    def offline(cls, root):
        calls.append(root)
        raise URLError("no network")

    monkeypatch.setattr(D, "_download_cifar", offline)
    with pytest.raises(D.DataError, match="CIFAR10 files not found .*download failed") as e:
        build_dataset(True, ns(data_set="CIFAR10", data_path=str(tmp_path / "nowhere"), input_size=32))
    assert "\n" not in str(e.value) and calls == [str(tmp_path / "nowhere")]
    _write_cifar(tmp_path, "CIFAR100")
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(D.DataError, match="missing meta"):
        build_dataset(True, ns(data_set="CIFAR100", data_path=str(tmp_path), input_size=32))
    monkeypatch.setattr(D, "_download_cifar", lambda cls, root: pytest.fail("present files must not download"))
    _write_cifar(tmp_path / "ok", "CIFAR10")
    build_dataset(True, ns(data_set="CIFAR10", data_path=str(tmp_path / "ok"), input_size=32))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_reader_refuses_code_and_garbage(tmp_path):
    _write_cifar(tmp_path, "CIFAR10")
    folder = tmp_path / "cifar-10-batches-py"
    _dump(folder / "data_batch_2", {"data": _Evil(), "labels": []})
    with pytest.raises(D.DataError, match="data_batch_2.*not allowed"):
        D.load_cifar("CIFAR10", str(tmp_path), True)
    (folder / "data_batch_2").write_bytes(b"\x80\x04truncated")
    with pytest.raises(D.DataError, match="unreadable CIFAR file .*data_batch_2"):
        D.load_cifar("CIFAR10", str(tmp_path), True)
    _dump(folder / "data_batch_2", {"data": np.zeros((2, 3072), np.uint8), "labels": [0]})
    with pytest.raises(D.DataError, match="need 2 'labels'"):
        D.load_cifar("CIFAR10", str(tmp_path), True)


# ------------------------------------------------------------------------------------------ iNaturalist
def test_inat_json_layout(tmp_path):
    cats = [
        {"id": 0, "name": "Apis mellifera", "genus": "Apis", "family": "Apidae"},
        {"id": 1, "name": "Apis cerana", "genus": "Apis", "family": "Apidae"},
        {"id": 2, "name": "Bombus terrestris", "genus": "Bombus", "family": "Apidae"},
    ]
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    for year in (2018, 2019):
        for split, cat_ids in (("train", [0, 1, 2, 2]), ("val", [2, 0])):
            images, anns = [], []
            for i, c in enumerate(cat_ids):
                rel = f"images/{split}{year}/{c}/{i}.jpg"
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                _rgb(20, 16, i + c).save(tmp_path / rel)
                images.append({"id": 100 + i, "file_name": rel})
                anns.append({"id": i, "image_id": 100 + i, "category_id": c})
            (tmp_path / f"{split}{year}.json").write_text(json.dumps({"images": images, "annotations": anns}))

    for name in ("INAT18", "INAT19"):
        a = ns(data_set=name, data_path=str(tmp_path), input_size=16)
        tr, nb = build_dataset(True, a)
        va, nb_val = build_dataset(False, a)
        # species, sorted: Apis cerana=0, Apis mellifera=1, Bombus terrestris=2
        assert (nb, nb_val) == (3, 3) and tr.targets == [1, 0, 2, 2] and va.targets == [2, 1]
        assert va[0][0].shape == (3, 16, 16)
    genus, nb_g = build_dataset(False, ns(data_set="INAT18", data_path=str(tmp_path), inat_category="genus",
                                            input_size=16))
    assert nb_g == 2 and genus.targets == [1, 0]
    with pytest.raises(D.DataError, match="unknown iNaturalist category level 'colour'"):
        build_dataset(True, ns(data_set="INAT18", data_path=str(tmp_path), inat_category="colour"))
    (tmp_path / "val2019.json").unlink()
    with pytest.raises(D.DataError, match="val2019.json"):
        build_dataset(False, ns(data_set="INAT19", data_path=str(tmp_path)))
