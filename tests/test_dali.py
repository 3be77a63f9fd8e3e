"""--data-backend dali against the PIL/timm path, on the real-image set, with DALI in CPU-only mode.

The tests need NVIDIA DALI (requirements-dali.txt): they skip with a reason without it, unless
TOE_REQUIRE_DALI=1 (CI), where a missing DALI fails them. The missing-package and refusal tests need no DALI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, child_env, killed_main, last_json, load_script, main_inprocess, read_log, run_main

# the augmentation recipe of DeiT at 64 px (the real-image set's size), as config/ builds it
AUG = dict(input_size=64, aa="rand-m9-mstd0.5-inc1", color_jitter=0.3, train_interpolation="bicubic", reprob=0.0,
           remode="pixel", recount=1, three_augment=False, simple_random_crop=False, eval_crop_ratio=0.875)


@pytest.fixture(scope="module")
def dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        message = f"NVIDIA DALI is not installed ({e}): pip install -r requirements-dali.txt"
        if os.environ.get("TOE_REQUIRE_DALI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning, module="nvidia.dali")


def _aug(**changes):
    import datasets

    return datasets.AugmentConfig(**{**AUG, **changes})


def _train_files(root: Path):
    import datasets

    folder = datasets.SafeImageFolder(str(root / "train"))
    return [p for p, _ in folder.samples], [t for _, t in folder.samples]


# ------------------------------------------------------------------------------------- no DALI needed
def test_missing_dali_is_one_line_exit_2(tmp_path):
    code = ("import sys; sys.modules['nvidia.dali'] = None; sys.path.insert(0, {root!r}); import main; "
            "sys.exit(main.main(sys.argv[1:]))").format(root=str(ROOT))
    args = TINY + ["--data-set", "IMNET", "--data-path", str(tmp_path), "--data-backend", "dali"]
    (tmp_path / "train").mkdir()
    proc = subprocess.run([sys.executable, "-c", code] + args, cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nvidia-dali-cuda120" in lines[0], proc.stderr


@pytest.mark.parametrize("extra, what", [(["--data-set", "FAKE"], "FAKE"),
                                         (["--data-set", "CIFAR10", "--data-path", "x"], "CIFAR10"),
                                         (["--data-set", "FAKE", "--ThreeAugment"], "FAKE")])
def test_unsupported_combinations_are_refused(extra, what):
    code, _, err = main_inprocess(TINY + extra + ["--data-backend", "dali"])
    assert code == 2 and err.count("\n") == 1 and what in err and "--data-backend pil" in err, err


# ----------------------------------------------------------------------------- per-op vs timm (PIL)
def _dali_op(index: int, level: float, images, negative: bool = False):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core import signed_bin

    from dali_loader import randaugment

    op = randaugment.build_ops(images[0].shape[0])[index]
    if op.mag_range is not None:
        op = op.augmentation(mag_range=(0, 10))

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
    def graph():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        sign = fn.random.coin_flip(probability=float(negative), dtype=types.INT32)  # 1: the magnitude negated
        bins = signed_bin(int(round(level * randaugment.LEVEL_STEPS)), random_sign=sign)
        return op(x, magnitude_bin=bins, num_magnitude_bins=10 * randaugment.LEVEL_STEPS + 1)

    pipe = graph()
    out = pipe.run()[0]
    return np.stack([np.array(out.at(i)) for i in range(len(images))]).astype(int)


def _timm_op(name: str, level: float, images, interpolation, monkeypatch, negative: bool = False):
    from PIL import Image
    from timm.data import auto_augment

    import augment
    from dali_loader.randaugment import IMAGENET_MEAN_RGB

    # the sign chosen on the DALI side
    monkeypatch.setattr(auto_augment, "_randomly_negate", (lambda v: -v) if negative else (lambda v: v))
    hparams = dict(translate_const=int(images[0].shape[0] * 0.45), img_mean=IMAGENET_MEAN_RGB,
                   interpolation=interpolation)
    op = auto_augment.AugmentOp(name, prob=1.0, magnitude=level, hparams=hparams)
    if name.startswith("Posterize"):
        op.aug_fn = augment.posterize_any_bits  # datasets.py swaps it in the same way
    return np.stack([np.asarray(op(Image.fromarray(i))) for i in images]).astype(int)


@pytest.mark.parametrize("negative", [False, True], ids=["positive", "negative"])
def test_each_randaugment_op_matches_timm(dali, real_image_set, monkeypatch, negative):
    """Each op at magnitude 9 on 8 real images, DALI vs timm's own op (bicubic, as DeiT's recipe), with the
    magnitude's sign + and - (the signed ops: Rotate, Shear, Translate and the four enhancements).
    Tolerances: the point ops must agree to rounding (mean |diff| <= 0.1 level); the geometric ops cannot
    interpolate bicubically in DALI, so their gap may be at most 1.5x the gap between PIL's own bilinear and
    bicubic results + 0.5; Sharpness differs on the 1-px border only; Equalize follows OpenCV's lookup
    table (inclusive histogram sum) where PIL uses the exclusive sum, a shift of about one histogram bin."""
    from PIL import Image

    from dali_loader.randaugment import OP_NAMES

    paths, _ = _train_files(real_image_set)
    images = [np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in paths[::125][:8]]
    report = {}
    for index, name in enumerate(OP_NAMES):
        ours = _dali_op(index, 9.0, images, negative)
        theirs = _timm_op(name, 9.0, images, Image.BICUBIC, monkeypatch, negative)
        gap = float(np.abs(ours - theirs).mean())
        report[name] = gap
        if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
            bilinear = _timm_op(name, 9.0, images, Image.BILINEAR, monkeypatch, negative)
            assert gap <= 1.5 * float(np.abs(bilinear - theirs).mean()) + 0.5, (name, gap)
            assert gap > 0.0
        elif name == "SharpnessIncreasing":
            inner = np.abs(ours - theirs)[:, 1:-1, 1:-1]
            assert inner.max() <= 1 and gap <= 0.5, (name, gap)
        elif name == "Equalize":
            assert gap <= 16.0, (name, gap)
        else:
            assert gap <= 0.1 and np.abs(ours - theirs).max() <= 1, (name, gap)
    print(json.dumps(report))


# ------------------------------------------------------------------------- statistics vs the PIL path
def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.fixture(scope="module")
def pil_record(real_image_set):
    """The PIL/timm training transform over the training set, recording its crops, flips and RandAugment
    ops and magnitudes through wrappers around timm's own functions."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    import datasets

    record = {"area": [], "aspect": [], "flips": 0, "ops": [], "levels": []}
    tf = datasets.build_train_transform(_aug())
    get_params = RandomResizedCropAndInterpolation.get_params
    hflip = TF.hflip

    def crop_params(img, scale, ratio):
        i, j, h, w = get_params(img, scale, ratio)
        record["area"].append(h * w / (img.size[0] * img.size[1]))
        record["aspect"].append(w / h)
        return i, j, h, w

    def counted_flip(img):
        record["flips"] += 1
        return hflip(img)

    ra = next(t for t in tf.transforms if type(t).__name__ == "RandAugment")
    for op in ra.ops:
        def aug_fn(img, *args, _name=op.name, _fn=op.aug_fn, **kwargs):
            record["ops"].append(_name)
            return _fn(img, *args, **kwargs)

        def level_fn(level, hparams, _fn=op.level_fn):
            record["levels"].append(level)
            return _fn(level, hparams)

        op.aug_fn = aug_fn
        if op.level_fn is not None:
            op.level_fn = level_fn
    paths, _ = _train_files(real_image_set)
    import random

    random.seed(0)
    import torch

    torch.manual_seed(0)
    RandomResizedCropAndInterpolation.get_params = staticmethod(crop_params)
    TF.hflip = counted_flip
    try:
        for p in paths:
            tf(Image.open(p).convert("RGB"))
    finally:
        RandomResizedCropAndInterpolation.get_params = staticmethod(get_params)
        TF.hflip = hflip
    record["n"] = len(paths)
    return record


@pytest.fixture(scope="module")
def dali_record(dali, real_image_set):
    from PIL import Image

    from dali_loader.loader import augment_files

    paths, labels = _train_files(real_image_set)
    sizes = np.array([Image.open(p).size[::-1] for p in paths], dtype=float)  # (H, W)
    batches = augment_files(_aug(), paths, labels, seed=5, batch_size=100)
    shape = np.concatenate([b[3] for b in batches]).astype(float)
    return {"area": shape[:, 0] * shape[:, 1] / (sizes[:, 0] * sizes[:, 1]), "aspect": shape[:, 1] / shape[:, 0],
            "flips": int(np.concatenate([b[4] for b in batches]).sum()),
            "ops": np.concatenate([b[5] for b in batches]).ravel(),
            "bins": np.concatenate([b[6] for b in batches]).ravel(),
            "images": np.concatenate([b[0] for b in batches]), "labels": np.concatenate([b[1] for b in batches]),
            "n": len(paths)}


def test_crop_area_matches_pil(pil_record, dali_record):
    # n = 1000 each: a coarse check of the whole graph's record (the KS statistic of two samples of one
    # distribution exceeds 0.087 with p < 0.001); test_dali_fidelity compares the crop window's area and
    # aspect with timm's on 10,000 samples, enough to tell log-uniform from uniform aspect
    assert _ks(pil_record["area"], dali_record["area"]) < 0.087
    assert 0.08 - 0.01 <= dali_record["area"].min() and dali_record["area"].max() <= 1.0


def test_flip_rate_matches_pil(pil_record, dali_record):
    n = dali_record["n"]
    sigma = (0.25 / n) ** 0.5
    for flips in (pil_record["flips"], dali_record["flips"]):
        assert abs(flips / n - 0.5) < 4 * sigma


def test_randaugment_op_frequencies_and_magnitudes_match_pil(pil_record, dali_record):
    from dali_loader.randaugment import LEVEL_STEPS, OP_NAMES

    layers = 2 * dali_record["n"]
    ops = dali_record["ops"]
    skipped = ops == len(OP_NAMES)
    # each layer is applied with p = 0.5, then one of the 15 ops uniformly: 4 sigma binomial bounds
    assert abs(skipped.mean() - 0.5) < 4 * (0.25 / layers) ** 0.5
    assert abs(len(pil_record["ops"]) / layers - 0.5) < 4 * (0.25 / layers) ** 0.5
    p = 0.5 / len(OP_NAMES)
    bound = 4 * (p * (1 - p) / layers) ** 0.5
    for k, name in enumerate(OP_NAMES):
        assert abs((ops == k).mean() - p) < bound, name
        assert abs(pil_record["ops"].count(name) / layers - p) < bound, name
    # magnitude: clip(N(9, 0.5), 0, 10) on both sides, DALI's rounded to 1 / LEVEL_STEPS
    ours = dali_record["bins"][~skipped] / LEVEL_STEPS
    theirs = np.array(pil_record["levels"])
    assert ours.min() >= 0 and ours.max() <= 10
    assert abs(ours.mean() - theirs.mean()) < 0.06 and abs(ours.std() - theirs.std()) < 0.06
    assert abs(ours.std() - 0.5) < 0.05
    assert _ks(ours, theirs) < 0.1  # rounding to 0.1 moves each value by <= 0.05 (0.04 of the KS scale here)


def test_image_statistics_match_pil(pil_record, dali_record, real_image_set):
    """The augmented images themselves: per-channel mean and spread of the normalised DALI output against
    the PIL transform's over the same files (a wrong normalisation or colour op would show here)."""
    import torch
    from PIL import Image

    import datasets

    tf = datasets.build_train_transform(_aug())
    paths, _ = _train_files(real_image_set)
    import random

    # the same 1000 files on both paths, so only the augmentations' randomness differs; timm's RandAugment also
    # draws from numpy, which must be seeded for the PIL side to be repeatable
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    pil = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]).numpy()
    ours = dali_record["images"]
    assert ours.shape[1:] == (3, 64, 64)
    assert np.abs(ours.mean(axis=(0, 2, 3)) - pil.mean(axis=(0, 2, 3))).max() < 0.08
    assert np.abs(ours.std(axis=(0, 2, 3)) - pil.std(axis=(0, 2, 3))).max() < 0.08


def test_colour_jitter_only_without_randaugment_and_like_pil(dali, real_image_set):
    """timm applies ColorJitter(0.3) only when --aa is none: with it, the spread of the per-image channel means
    grows as on the PIL path; with RandAugment the jitter strength changes nothing."""
    import torch
    from PIL import Image

    import datasets
    from dali_loader.loader import augment_files

    import random

    paths, labels = _train_files(real_image_set)

    def spread(aug):
        ours = np.concatenate([b[0] for b in augment_files(aug, paths, labels, seed=2, batch_size=100)])
        tf = datasets.build_train_transform(aug)
        random.seed(2)  # timm's crop draws from random, torchvision's flip and jitter from torch
        torch.manual_seed(2)
        theirs = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]).numpy()
        return ours.mean(axis=(2, 3)).std(axis=0), theirs.mean(axis=(2, 3)).std(axis=0)

    plain_ours, plain_pil = spread(_aug(aa="none", color_jitter=0.0))
    jitter_ours, jitter_pil = spread(_aug(aa="none", color_jitter=0.3))
    assert (jitter_ours / plain_ours).mean() > 1.03 and (jitter_pil / plain_pil).mean() > 1.03
    # measured: spread ratios dali 1.13 / 1.13 / 1.08, pil 1.11 / 1.11 / 1.07 (R, G, B; both sides seeded)
    assert np.abs(jitter_ours / plain_ours - jitter_pil / plain_pil).max() < 0.08
    with_ra = [np.concatenate([b[0] for b in augment_files(_aug(color_jitter=cj), paths[:100], labels[:100],
                                                           seed=2, batch_size=100)]) for cj in (0.0, 0.3)]
    assert np.array_equal(with_ra[0], with_ra[1])


# --------------------------------------------------------------------------------- loaders
def _folder(root: Path, split: str):
    import datasets

    return datasets.SafeImageFolder(str(root / split), class_root=str(root / "train"))


def test_eval_output_matches_pil(dali, real_image_set):
    """Evaluation at 48 px (resize 54, centre crop 48), DALI vs torchvision, in pixel units (x std x 255)."""
    import torch

    import datasets
    from dali_loader.loader import DaliEvalLoader

    val = _folder(real_image_set, "val")
    sampler = torch.utils.data.SequentialSampler(range(64))
    loader = DaliEvalLoader(val, sampler, 48, 0.875, 32, 1, torch.device("cpu"))
    images, labels = map(torch.cat, zip(*list(loader)))
    tf = datasets.build_eval_transform(48, 0.875)
    reference = torch.stack([tf(datasets._load_rgb(val.samples[i][0])) for i in range(64)])
    assert labels.tolist() == [val.samples[i][1] for i in range(64)]
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    gap = ((images - reference).abs() * std)
    # measured: mean 0.19, 99th percentile 1.0, max 9 levels (DALI's antialiased cubic vs PIL's bicubic)
    assert gap.mean() < 0.5 and float(gap.quantile(0.99)) <= 1.5, (float(gap.mean()), float(gap.max()))


def test_train_loader_is_seeded_and_erases_at_reprob(dali, real_image_set, monkeypatch):
    import torch
    from timm.data.random_erasing import RandomErasing

    from dali_loader.loader import DaliTrainLoader

    erased = []
    original = RandomErasing._erase

    def counting(self, img, *args, **kwargs):
        before = img.clone()
        original(self, img, *args, **kwargs)
        erased.append(bool((img != before).any()))

    monkeypatch.setattr(RandomErasing, "_erase", counting)
    train = _folder(real_image_set, "train")
    sampler = torch.utils.data.SequentialSampler(range(400))
    runs = []
    for threads in (1, 2):
        generator = torch.Generator().manual_seed(3)
        torch.manual_seed(0)
        import random

        random.seed(0)
        loader = DaliTrainLoader(train, sampler, _aug(reprob=0.25), 100, threads, torch.device("cpu"), generator)
        assert len(loader) == 4
        runs.append(torch.cat([b for b, _ in loader]))
    assert torch.equal(runs[0], runs[1])  # the thread count does not change the result
    rate = np.mean(erased)
    assert len(erased) == 800 and abs(rate - 0.25) < 4 * (0.25 * 0.75 / 800) ** 0.5


def test_undecodable_file_is_named_or_skipped(dali, real_image_set, tmp_path):
    import shutil

    import torch

    import datasets
    from dali_loader.loader import DaliTrainLoader

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for k, p in enumerate(sorted((real_image_set / "train").iterdir())[0].iterdir()):
            if k < 6:
                shutil.copy(p, tmp_path / cls / p.name)
    bad = tmp_path / "a" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    sampler = torch.utils.data.SequentialSampler(range(13))
    strict = datasets.SafeImageFolder(str(tmp_path))
    with pytest.raises(datasets.CorruptImageError, match="zz_broken.jpg"):
        list(DaliTrainLoader(strict, sampler, _aug(), 13, 1, torch.device("cpu"), torch.Generator()))
    lenient = datasets.SafeImageFolder(str(tmp_path), skip_bad_images=True)
    batches = list(DaliTrainLoader(lenient, sampler, _aug(), 13, 1, torch.device("cpu"), torch.Generator()))
    assert len(batches) == 1 and batches[0][0].shape == (13, 3, 64, 64)
    assert datasets.skipped_images(lenient) == 1 and datasets.bad_images(lenient) == [str(bad)]


# ------------------------------------------------------------------------------ training through main.py
# 48 px (the random-resized-crop branch; 32 px would take the padded-crop one), patch 8: 36 patches
REAL = TINY + ["--input-size", "48", "--model-kwargs", "patch_size=8", "depth=3", "embed_dim=64", "num_heads=2",
               "--data-set", "IMNET", "--batch-size", "25", "--epochs", "4", "--no-model-ema",
               "--mixup", "0", "--cutmix", "0",
               "--toe-r1", "0.5", "--toe-ng", "3", "--seed", "7", "--print-freq", "1", "--num_workers", "1"]


def _real(root: Path, out: Path, backend: str) -> list:
    return REAL + ["--data-path", str(root), "--output_dir", str(out), "--data-backend", backend]


@pytest.fixture(scope="module")
def dali_run(dali, real_image_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("dali_run")
    proc = run_main(_real(real_image_set, out, "dali"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout}


@pytest.mark.slow
def test_dali_training_learns_like_pil_and_records_the_backend(dali_run, real_image_set, tmp_path):
    first = dali_run["stdout"].splitlines()[0]
    assert first.startswith("run: ") and "data backend dali" in first
    assert json.loads((dali_run["out"] / "args.json").read_text())["data_backend"] == "dali"
    pil = run_main(_real(real_image_set, tmp_path, "pil"), timeout=600)
    assert pil.returncode == 0, pil.stderr[-3000:]
    ours, theirs = read_log(dali_run["out"] / "log.txt"), read_log(tmp_path / "log.txt")
    assert [r["toe_stage"] for r in ours] == [r["toe_stage"] for r in theirs] == [1, 1, 2, 3]
    # 10 classes, chance 10 %: both must learn (seen: pil 13-21 %, dali 14-19 % over the 4 epochs) and end
    # within 8 points of each other (300 val images: one run's accuracy alone has a 2-point binomial sigma)
    print("dali", [r["test_acc1"] for r in ours], "pil", [r["test_acc1"] for r in theirs])
    assert max(r["test_acc1"] for r in ours) >= 16 and max(r["test_acc1"] for r in theirs) >= 16
    assert abs(ours[-1]["test_acc1"] - theirs[-1]["test_acc1"]) <= 8
    assert ours[-1]["train_loss"] < ours[0]["train_loss"]


@pytest.mark.slow
def test_dali_kill_and_rerun_is_bitwise(dali_run, real_image_set, tmp_path):
    import signal

    import torch

    args = _real(real_image_set, tmp_path, "dali")
    proc = subprocess.run(killed_main(1, 3) + args, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    again = run_main(args, timeout=600)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    ref = torch.load(dali_run["out"] / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    got = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


_RECORDING_MAIN = """
import json, os, sys
sys.path.insert(0, {root!r})
from dali_loader import loader
_call = loader._BatchSource.__call__
seen = {{"train": [], "eval": []}}
def call(self, info):
    out = _call(self, info)
    kind = "train" if isinstance(self.loader, loader.DaliTrainLoader) else "eval"
    seen[kind].extend(self.loader.batch_indices(self.indices, self.first + info.iteration))
    return out
loader._BatchSource.__call__ = call
import main
code = main.main(sys.argv[1:])
with open(os.path.join({out!r}, "seen%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


@pytest.mark.slow
def test_two_gloo_ranks_see_disjoint_samples_and_evaluate_exactly(dali, real_image_set, tmp_path):
    script = tmp_path / "recording_main.py"
    script.write_text(_RECORDING_MAIN.format(root=str(ROOT), out=str(tmp_path)))
    args = _real(real_image_set, tmp_path, "dali") + ["--epochs", "1", "--toe-epochs", "3", "--no-repeated-aug",
                                                      "--dist-eval"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + [str(script)] + args, cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert not set(seen[0]["train"]) & set(seen[1]["train"])
    assert len(seen[0]["train"]) == len(seen[1]["train"]) == 500  # 1000 images, 20 batches of 25 per rank
    assert sorted(seen[0]["eval"] + seen[1]["eval"]) == list(range(300))  # each val image once
    row = read_log(tmp_path / "log.txt")[0]
    assert row["test_images"] == 300
    # one process evaluating the saved weights gives the same numbers
    single = run_main(REAL + ["--data-path", str(real_image_set), "--data-backend", "dali", "--eval",
                              "--resume", str(tmp_path / "checkpoint.pth")], timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    result = last_json(single.stdout)
    assert result["n"] == 300 and result["test_acc1"] == row["test_acc1"]
    assert result["test_loss"] == pytest.approx(row["test_loss"], rel=1e-5)


def test_policies_it_cannot_run_are_refused_in_one_line(dali, real_image_set):
    code, _, err = main_inprocess(REAL + ["--data-path", str(real_image_set), "--data-backend", "dali",
                                          "--aa", "rand-m9-mstd0.5", "--epochs", "3"])
    assert code == 2 and err.count("\n") == 1 and "inc1" in err, err


def test_curriculum_phase_sets_size_and_magnitude(dali, real_image_set):
    """A curriculum phase (datasets.aa_with_magnitude, as the trainer builds it) reaches the DALI graph:
    40 px output and magnitude levels around 3."""
    import datasets
    from dali_loader.loader import augment_files
    from dali_loader.randaugment import LEVEL_STEPS, OP_NAMES

    paths, labels = _train_files(real_image_set)
    phase = _aug().with_train_stage(40, datasets.aa_with_magnitude(AUG["aa"], 3))
    batches = augment_files(phase, paths[:200], labels[:200], seed=1, batch_size=100)
    images = np.concatenate([b[0] for b in batches])
    ops, bins = (np.concatenate([b[k] for b in batches]).ravel() for k in (5, 6))
    levels = bins[ops != len(OP_NAMES)] / LEVEL_STEPS
    assert images.shape == (200, 3, 40, 40)
    assert abs(levels.mean() - 3.0) < 0.15 and abs(levels.std() - 0.5) < 0.1


@pytest.mark.slow
def test_curriculum_training_with_dali(dali, real_image_set, tmp_path):
    # with mixup/CutMix on (on the batch, after the loader)
    args = _real(real_image_set, tmp_path, "dali") + ["--epochs", "2", "--toe-epochs", "3", "--batch-size", "20",
                                                      "--mixup", "0.8", "--cutmix", "1.0",
                                                      "--curriculum-table", "0:40:1,1:48:9"]
    proc = run_main(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_log(tmp_path / "log.txt")
    assert [r["train_input_size"] for r in rows] == [40, 48] and [r["aa_magnitude"] for r in rows] == [1, 9]


def _bench_data():
    return load_script("benchmarks/bench_data.py")


def test_bench_data_compares_the_backends(dali, real_image_set, capsys):
    bench = _bench_data()
    code = bench.main(["--data-path", str(real_image_set), "--input-size", "64", "--batch-size", "16", "--batches",
                       "2", "--repeats", "1", "--backend", "pil", "dali", "--only-backends", "--device", "cpu",
                       "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out.strip().splitlines()[-1])["backends"]
    assert [(r["backend"], r["cores"]) for r in rows][:2] == [("pil", 1), ("dali", 1)]
    assert all(r["img_per_s"] > 0 and r["img_per_s_per_core"] == r["img_per_s"] for r in rows[:2])
    assert "full training pipeline at 64 px by backend" in out
    code = bench.main(["--fake-size", "64", "--backend", "dali", "--only-backends", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--backend dali reads image files" in err


def test_backend_change_on_resume_is_noted_not_refused():
    """pil and dali apply the same recipe with slightly different ops (docs/dali.md): resuming under the other
    backend continues, with the change in the notice and log.txt's resumed_with_changes row."""
    from training import resume

    blocking, noted = resume.changes_since({"data_backend": "pil", "model": "m"}, {"data_backend": "dali",
                                                                                  "model": "m"})
    assert blocking == {} and noted == {"data_backend": ["pil", "dali"]}
