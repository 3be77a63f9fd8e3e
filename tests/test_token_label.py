"""Token labeling: the "reference" targets against a naive full-C implementation (zero-filled logits,
torchvision roi_align on the crop box, flips, softmax over all C), the closed-form loss, ground-truth mixing,
label-map geometry under crop / flip / spatial RandAugment, bad data (errors.DataError or counted skips),
generate_label.py (CNN and ViT teachers, resume) and a short LV-ViT + ToE training run."""
import importlib.util
import math
import os
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align

import models  # noqa: F401
import toe
import token_label as tl
from datasets import bad_images, skipped_images
from runtime.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_label", os.path.join(ROOT, "scripts", "generate_label.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gl = _load_script()

PLAIN = dict(auto_augment=None, color_jitter=0.0, interpolation="bicubic", re_prob=0.0, re_mode="pixel", re_count=1)
DATA_AUG = dict(aa=None, color_jitter=0.0, interpolation="bicubic", re_prob=0.0, re_mode="pixel", re_count=1)


# ---- naive reference: the zero-filled C-vector, resampled at full C ----------------------------------------
def random_map(k, h, w, c, g, scale=3.0):
    """[2, k, h, w] file-format map: distinct random classes per cell, raw logits of either sign."""
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(h * w)]).T.reshape(k, h, w)
    return torch.stack([torch.randn(k, h, w, generator=g) * scale, idx.float()])


def naive_reference(raw, box, image_hw, out_size, flip, c):
    """LV-ViT's recipe written out: scatter the top-K logits into zeros [C, H, W], flip the whole map
    (TokenLabeling flips before it crops; ``box`` is on the flipped image), roi_align the crop box given as
    normalised (x1, y1, x2, y2) * map size - 0.5 (aligned=False), softmax over all C.
    Returns (dense targets [S*S, C], class target [C])."""
    full = torch.zeros(c, *raw.shape[2:]).scatter_(0, raw[1].long(), raw[0])
    if flip:
        full = full.flip(-1)
    top, left, bh, bw = box
    img_h, img_w = image_hw
    mh, mw = raw.shape[2:]
    coords = torch.tensor([left / img_w * mw, top / img_h * mh, (left + bw) / img_w * mw, (top + bh) / img_h * mh])
    rois = torch.cat([torch.zeros(1), coords - 0.5])[None]
    dense = roi_align(full[None], rois, output_size=(out_size, out_size))[0]
    cls = roi_align(full[None], rois, output_size=(1, 1))[0].flatten()
    return dense.flatten(1).T.softmax(-1), cls.softmax(-1)


def _fixed_crop(tf, box):
    tf.crop.get_params = lambda img, scale, ratio: box  # instance attribute shadows the static method
    return tf


@pytest.mark.parametrize("map_side,label_size,img_hw", [(6, 6, (48, 48)), (6, 4, (40, 60)), (5, 7, (35, 35))])
def test_reference_targets_match_naive_full_c_roi_align(map_side, label_size, img_hw):
    g = torch.Generator().manual_seed(map_side * 10 + label_size)
    rng = random.Random(label_size)
    k, c = 3, 150  # up to k*36 = 108 distinct classes: every bilinear neighbourhood mixes disjoint class sets
    img = Image.new("RGB", (img_hw[1], img_hw[0]))
    boxes = [(0, 0, *img_hw), (img_hw[0] // 3, img_hw[1] // 5, img_hw[0] // 2, img_hw[1] // 2),
             (img_hw[0] - 9, img_hw[1] - 11, 9, 11)]  # whole image, inner box, a corner box of ~1.5 cells
    torch.manual_seed(label_size)  # torchvision draws crop boxes with torch's generator
    boxes += [T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(5)]
    checked_flip = set()
    for n, box in enumerate(boxes):
        raw = random_map(k, map_side, map_side, c, g)
        flip = n % 2 == 1
        tf = _fixed_crop(tl.TokenLabelTransform(16, label_size, target="reference", hflip=float(flip), **PLAIN), box)
        x, (dense, cls_map) = tf(img, raw, rng.randrange(c))
        assert dense.shape == (2, tl.dense_slots(k, map_side, map_side, label_size), label_size, label_size)
        assert cls_map.shape == (2, k * map_side ** 2, 1, 1)
        want_dense, want_cls = naive_reference(raw, box, img_hw, label_size, flip, c)
        torch.testing.assert_close(tl.dense_targets(dense[None], c)[0], want_dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tl.class_logits(cls_map[None], c)[0].softmax(-1), want_cls, rtol=1e-5, atol=1e-6)
        # the loss on these maps equals the soft CE against the naive targets (eps = 0.1 smoothing)
        aux = torch.randn(1, label_size ** 2, c, generator=g) * 2
        cls = torch.randn(1, c, generator=g)
        crit = tl.TokenLabelCrossEntropy(cls_weight=0.6, dense_weight=1.3, smoothing=0.1)
        t_dense = want_dense * 0.9 + 0.1 / c
        t_cls = want_cls * 0.9 + 0.1 / c
        expect = 0.6 * -(t_cls * cls.log_softmax(-1)).sum() + 1.3 * -(t_dense * aux[0].log_softmax(-1)).sum(-1).mean()
        got = crit((cls, aux, None), (torch.tensor([0]), dense[None], cls_map[None]))
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        checked_flip.add(flip)
    assert checked_flip == {False, True}


def test_class_target_from_a_whole_map_is_the_full_box_roi_align():
    """Maps in the file format without a class map (e.g. SyntheticTokenLabels): the class target is the
    map pooled over the whole image."""
    g = torch.Generator().manual_seed(5)
    raws = torch.stack([random_map(4, 5, 5, 30, g) for _ in range(3)])
    crit = tl.TokenLabelCrossEntropy(dense_weight=0.0, smoothing=0.0)
    cls = torch.randn(3, 30, generator=g)
    want = torch.stack([naive_reference(r, (0, 0, 50, 50), (50, 50), 5, False, 30)[1] for r in raws])
    torch.testing.assert_close(crit.class_target(torch.zeros(3, dtype=torch.long), raws, 30), want)
    got = crit((cls, torch.zeros(3, 25, 30), None), (torch.zeros(3, dtype=torch.long), raws))
    torch.testing.assert_close(got, -(want * cls.log_softmax(-1)).sum(-1).mean())


def test_ground_truth_mixing_rule():
    g = torch.Generator().manual_seed(1)
    c = 6
    # class map [B, 2, 2, 1, 1]: sample 0's teacher prefers class 2, sample 1's class 4
    cls_map = torch.tensor([[[[[3.0]], [[1.0]]], [[[2.0]], [[5.0]]]],
                            [[[[4.0]], [[0.5]]], [[[4.0]], [[1.0]]]]])
    label = torch.tensor([2, 0])  # agrees with the teacher for sample 0 only
    teacher = tl.class_logits(cls_map, c).softmax(-1)
    assert teacher.argmax(-1).tolist() == [2, 4]
    for eps in (0.0, 0.1):
        smooth = lambda t: t * (1 - eps) + eps / c  # noqa: E731
        gt = smooth(F.one_hot(label, c).float())
        crit = tl.TokenLabelCrossEntropy(smoothing=eps, ground_truth=True)
        want = torch.stack([0.5 * smooth(teacher[0]) + 0.5 * gt[0], 0.9 * smooth(teacher[1]) + 0.1 * gt[1]])
        torch.testing.assert_close(crit.class_target(label, cls_map, c), want)
        off = tl.TokenLabelCrossEntropy(smoothing=eps)
        torch.testing.assert_close(off.class_target(label, cls_map, c), smooth(teacher))
    # MixToken mixes after the ground-truth mixing
    crit = tl.TokenLabelCrossEntropy(dense_weight=0.0, smoothing=0.0, ground_truth=True)
    t = crit.class_target(label, cls_map, c)
    cls = torch.randn(2, c, generator=g)
    lam = 1 - 4 / 9
    t_mix = lam * t + (1 - lam) * t.flip(0)
    got = crit((cls, torch.zeros(2, 9, c), (0, 1, 2, 3)), (label, torch.zeros(2, 2, 1, 3, 3), cls_map))
    torch.testing.assert_close(got, -(t_mix * cls.log_softmax(-1)).sum(-1).mean())
    with pytest.raises(ValueError, match="ground_truth"):
        tl.TokenLabelCrossEntropy(target="topk", ground_truth=True)


@pytest.mark.parametrize("target", tl.TARGETS)
def test_closed_form_dense_loss_matches_explicit_targets(target):
    """Large logits (exp overflows float32), empty slots and a location listing every class."""
    g = torch.Generator().manual_seed(2)
    b, s, c, k = 3, 2, 5, 5
    vals = torch.randn(b, k, s, s, generator=g) * 40
    idx = torch.stack([torch.randperm(c, generator=g) for _ in range(b * s * s)])
    idx = idx.reshape(b, s, s, k).permute(0, 3, 1, 2).float()
    idx[0, 2:, 0, 1] = -1  # two listed classes only
    idx[1, 1:, 1, 1] = -1
    lmap = torch.stack([vals, idx], 1)
    aux = torch.randn(b, s * s, c, generator=g) * 3
    t = tl.dense_targets(lmap, c, smoothing=0.1, target=target)
    assert torch.isfinite(t).all()
    torch.testing.assert_close(t.sum(-1), torch.ones(b, s * s))
    # explicit targets, written out per location
    manual = torch.zeros(b, s * s, c)
    for bi in range(b):
        for pos in range(s * s):
            listed = [(float(vals[bi, j].flatten()[pos]), int(idx[bi, j].flatten()[pos])) for j in range(k)]
            listed = [(v, i) for v, i in listed if i >= 0]
            full = torch.zeros(c) if target == "reference" else torch.full((c,), float("-inf"))
            for v, i in listed:
                full[i] = v
            manual[bi, pos] = full.double().softmax(0).float() * 0.9 + 0.1 / c
    torch.testing.assert_close(t, manual)
    crit = tl.TokenLabelCrossEntropy(smoothing=0.1, target=target)
    mask = torch.tensor([[True, False, True, True], [True] * 4, [False, False, True, False]])
    ce = -(manual * aux.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(crit.dense_loss(aux, lmap), ce.mean())
    torch.testing.assert_close(crit.dense_loss(aux, lmap, mask), ce[mask].mean())


def test_topk_target_is_the_earlier_loss():
    g = torch.Generator().manual_seed(0)
    b, s, c = 4, 3, 12
    cls = torch.randn(b, c, generator=g)
    aux = torch.randn(b, s * s, c, generator=g)
    idx = torch.stack([torch.randperm(c, generator=g)[:5] for _ in range(b * s * s)])
    lmap = torch.stack([torch.randn(b, 5, s, s, generator=g),
                        idx.reshape(b, s, s, 5).permute(0, 3, 1, 2).float()], 1)
    y = torch.tensor([0, 5, 7, 11])
    mask = torch.rand(b, s * s, generator=g) > 0.3
    eps = 0.1
    crit = tl.TokenLabelCriterion(cls_weight=0.7, dense_weight=0.5, smoothing=eps, target="topk")
    onehot = F.one_hot(y, c).float() * (1 - eps) + eps / c
    lam = 1 - 4 / 9
    t_cls = lam * onehot + (1 - lam) * onehot.flip(0)
    loss_cls = -(t_cls * cls.log_softmax(-1)).sum(-1).mean()
    dense = torch.zeros(b, s * s, c)
    p = lmap[:, 0].softmax(1)
    for bi in range(b):
        for pos in range(s * s):
            for j in range(5):
                dense[bi, pos, int(lmap[bi, 1, j].flatten()[pos])] += p[bi, j].flatten()[pos]
    dense = dense * (1 - eps) + eps / c
    ce = -(dense * aux.log_softmax(-1)).sum(-1)
    got = crit(torch.zeros(1), (cls, aux, (0, 1, 2, 3), mask), (y, lmap))
    torch.testing.assert_close(got, 0.7 * loss_cls + 0.5 * ce[mask].mean())
    # soft class targets are used as given
    got = crit(None, (cls, aux, None), (t_cls, lmap))
    torch.testing.assert_close(got, 0.7 * -(t_cls * cls.log_softmax(-1)).sum(-1).mean() + 0.5 * ce.mean())


def test_loss_input_errors_and_defaults():
    crit = tl.TokenLabelCrossEntropy()
    assert (crit.cls_weight, crit.dense_weight, crit.target, crit.ground_truth) == (1.0, 1.0, "reference", False)
    assert tl.TokenLabelCriterion().loss.dense_weight == 1.0
    g = torch.Generator().manual_seed(0)
    lmap = torch.stack([random_map(5, 3, 3, 12, g) for _ in range(2)])
    cls, aux, y = torch.randn(2, 12), torch.randn(2, 9, 12), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="token-label-size"):
        crit((cls, aux[:, :4], None), (y, lmap))
    with pytest.raises(ValueError, match="out of range"):
        crit((cls[:, :5], aux[..., :5], None), (y, lmap))
    with pytest.raises(TypeError, match="return_dense"):
        crit(cls, (y, lmap))
    with pytest.raises(ValueError, match="target must be one of"):
        tl.TokenLabelCrossEntropy(target="soft")


# ---- geometry: synthetic "position" map and image, class of cell (a, b) is a * G + b -------------------
G = 8          # cells per side of the synthetic map
TARGET = G * G  # image class (the topk fill outside the source)
NCLS = G * G + 5


def position_map():
    """[2, 5, G, G]: top-1 = the cell's own class (logit 6), then 4 shared background classes."""
    a, b = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    idx = torch.stack([(a * G + b).float()] + [torch.full((G, G), float(G * G + 1 + i)) for i in range(4)])
    logits = torch.stack([torch.full((G, G), v) for v in (6.0, 1.0, 0.5, 0.0, -0.5)])
    return torch.stack([logits, idx])


def position_image(side):
    """RGB image whose pixels in cell (a, b) are (32a + 16, 32b + 16, 255)."""
    cell = side // G
    a = (np.arange(side) // cell)[:, None].repeat(side, 1)
    b = (np.arange(side) // cell)[None, :].repeat(side, 0)
    arr = np.stack([a * 32 + 16, b * 32 + 16, np.full_like(a, 255)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def decode(x):
    """Image tensor [3, H, W] in [0, 1] -> class per pixel (fill colour -> TARGET)."""
    v = (x * 255).round().long()
    cls = ((v[0] - 16) // 32) * G + (v[1] - 16) // 32
    return torch.where(v[2] > 128, cls, torch.full_like(cls, TARGET))


def top1(label_map):
    """Slot 0 is the largest value; an all-empty location (reference fill: no evidence) reads as TARGET."""
    idx = label_map[1, 0].long()
    return torch.where(idx >= 0, idx, torch.full_like(idx, TARGET))


def test_topk_dense_round_trip():
    lm = position_map()
    classes, probs = tl.topk_to_dense(lm, extra_class=TARGET)
    assert TARGET in classes.tolist() and torch.allclose(probs.sum(0), torch.ones(G, G))
    back = tl.dense_to_topk(classes, probs, 5)
    torch.testing.assert_close(tl.dense_targets(back[None], NCLS, target="topk"),
                               tl.dense_targets(lm[None], NCLS, target="topk"))
    # fewer classes than K: the other slots are empty
    small = tl.dense_to_topk(torch.tensor([3, 7]), torch.tensor([[[0.25]], [[0.75]]]), 5)
    assert small[1, :, 0, 0].tolist() == [7, 3, -1, -1, -1]
    d = tl.dense_targets(small[None], 10, target="topk")[0, 0]
    torch.testing.assert_close(d, torch.tensor([0, 0, 0, .25, 0, 0, 0, .75, 0, 0]))


def test_sparse_round_trip_keeps_exactly_the_non_zero_classes():
    lm = position_map()
    classes, logits = tl.scatter_logits(lm)
    assert classes.tolist() == sorted(set(lm[1].long().flatten().tolist()))
    back = tl.dense_to_sparse(classes, logits, 6)
    assert back[1, 4:].eq(-1).all() and back[1, :4].ge(0).all()  # 4 non-zero classes (one logit is 0.0)
    torch.testing.assert_close(tl.dense_targets(back[None], NCLS), tl.dense_targets(lm[None], NCLS))
    with pytest.raises(RuntimeError, match="slots"):
        tl.dense_to_sparse(classes, logits, 3)


@pytest.mark.parametrize("box", [(0, 0, 128, 128), (16, 40, 50, 70), (3, 77, 101, 45), (60, 9, 33, 33)])
def test_crop_dense_map_matches_box_geometry(box):
    """Each output cell's top-1 class is the class of the source cell under its bin centre."""
    classes, probs = tl.topk_to_dense(position_map())
    out = tl.crop_dense_map(probs, box, (128, 128), G)
    got = classes[out.argmax(0)]
    flipped = classes[out.flip(-1).argmax(0)]
    i, j, h, w = box
    checked = 0
    for u in range(G):
        for v in range(G):
            y = (i + (u + 0.5) * h / G) / 16  # source point in map cells
            x = (j + (v + 0.5) * w / G) / 16
            if min(abs(y - round(y)), abs(x - round(x))) < 0.02:
                continue  # on a cell boundary: either side is right
            assert int(got[u, v]) == math.floor(y) * G + math.floor(x), (u, v)
            assert int(flipped[u, G - 1 - v]) == math.floor(y) * G + math.floor(x)
            checked += 1
    assert checked >= G * G // 2


def _consistency(tf, seeds, side=128):
    """Run the joint transform; compare the label's top-1 with the image classes around each cell centre."""
    img = position_image(side)
    total = ok = 0
    for seed in seeds:
        random.seed(seed)
        x, (lm, *_) = tf(img, position_map(), TARGET)
        cls = decode(x)
        lab = top1(lm)
        step = x.shape[-1] // G
        for u in range(G):
            for v in range(G):
                c = u * step + step // 2
                d = v * step + step // 2
                near = set(cls[c - 1:c + 1, d - 1:d + 1].flatten().tolist())
                ok += int(lab[u, v]) in near
                total += 1
    return ok / total


@pytest.mark.parametrize("target", tl.TARGETS)
def test_random_crop_and_flip_consistent_with_image(target):
    tf = tl.TokenLabelTransform(64, G, auto_augment=None, color_jitter=0.0, interpolation="nearest",
                                re_prob=0.0, re_mode="pixel", re_count=1, target=target, mean=(0, 0, 0),
                                std=(1, 1, 1), scale=(0.2, 1.0), hflip=0.5)
    assert _consistency(tf, range(12)) == 1.0


@pytest.mark.parametrize("target", tl.TARGETS)
def test_spatial_randaugment_consistent_with_image(target):
    # full-image crop so label cells coincide with the source cells; only the spatial ops, always applied
    tf = tl.TokenLabelTransform(64, G, auto_augment="rand-m9-n2-mstd0.5-p1.0", color_jitter=0.0,
                                interpolation="nearest", re_prob=0.0, re_mode="pixel", re_count=1, target=target,
                                mean=(0, 0, 0), std=(1, 1, 1), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5,
                                ra_transforms=list(tl.SPATIAL_OPS[:3]) + ["TranslateXRel", "TranslateYRel"])
    assert _consistency(tf, range(30)) >= 0.97
    # the map really moved, and (reference) the fill outside the source is "no class": all slots empty
    random.seed(0)
    lm = tf(position_image(128), position_map(), TARGET)[1][0]
    assert not torch.equal(top1(lm), top1(position_map()))
    if target == "reference":
        assert bool((lm[1] == -1).all(0).any())


def test_randaugment_acts_on_the_whole_image_before_the_crop():
    """TokenLabeling's order: RandAugment on the whole image and map, then the crop, and the class target is
    pooled from the augmented map. A translation by 40.5 % of the WHOLE width (TranslateXRel, m9, no noise)
    then a fixed top-left-quadrant crop: the crop shows source column 3 (shift right) or fill (shift left);
    cropping first would shift by 40.5 % of the crop and show column 1."""
    tf = _fixed_crop(tl.TokenLabelTransform(32, G, auto_augment="rand-m9-n1-mstd0-p1.0", color_jitter=0.0,
                                            interpolation="nearest", re_prob=0.0, re_mode="pixel", re_count=1,
                                            target="reference", mean=(0, 0, 0), std=(1, 1, 1), hflip=0.0,
                                            ra_transforms=["TranslateXRel"]), (0, 0, 64, 64))
    signs = set()
    for seed in range(10):
        random.seed(seed)
        x, (lm, cls_map) = tf(position_image(128), position_map(), TARGET)
        corner = int(decode(x)[0, 0])
        assert corner in (3, TARGET)  # source column 3 of row 0, or fill
        assert int(top1(lm)[0, 0]) == corner
        pooled = tl.class_logits(cls_map[None], NCLS)[0][:G * G].reshape(G, G)
        columns = set(torch.nonzero(pooled.abs().sum(0)).flatten().tolist())
        # pooled after the shift: the columns the crop shows (and their bilinear neighbour), not 0..3
        assert columns <= ({3, 4, 5, 6, 7} if corner == 3 else {0, 1}), (seed, columns)
        signs.add(corner == 3)
    assert signs == {True, False}


def test_randaugment_runs_timms_own_ops():
    """The image goes through timm's AugmentOp (probability, magnitude draw, op) unchanged: with the same
    random state our wrapper gives the same image as timm's RandAugment op, and records that op's level."""
    from timm.data.auto_augment import rand_augment_transform
    img = position_image(64)
    hp = {"img_mean": (0, 0, 0)}
    ours = tl.LabelAwareRandAugment("rand-m9-n1-mstd1.0-p1.0", hp, transforms=["Rotate"])
    timm_op = rand_augment_transform("rand-m9-n1-mstd1.0-p1.0", dict(hp), transforms=["Rotate"]).ops[0]
    for seed in range(4):
        random.seed(seed)
        got, _ = ours(img, torch.zeros(1, G, G), torch.zeros(1))
        (matrix,) = ours._applied
        random.seed(seed)
        random.random()  # the op choice
        want = timm_op(img)
        assert np.array_equal(np.asarray(got), np.asarray(want))
        angle = math.degrees(math.atan2(matrix[1], matrix[0]))  # the inverse map rotates by -level
        assert 0 < abs(angle) <= 30.0 + 1e-6


@pytest.mark.parametrize("target,slots", [("reference", 20), ("topk", 5)])
def test_full_randaugment_survives_max_magnitude(target, slots):
    """m10 with mstd noise reaches PosterizeIncreasing's 0 bits, which Pillow >= 13 rejects."""
    tf = tl.TokenLabelTransform(32, G, auto_augment="rand-m10-n4-mstd0.5-inc1-p1.0", color_jitter=0.0,
                                interpolation="bicubic", re_prob=0.0, re_mode="pixel", re_count=1, target=target,
                                ra_transforms=["PosterizeIncreasing", "SolarizeIncreasing", "Rotate"])
    for seed in range(8):
        random.seed(seed)
        x, (lm, *rest) = tf(position_image(64), position_map(), TARGET)
        assert x.shape == (3, 32, 32) and lm.shape == (2, slots, G, G) and torch.isfinite(x).all()
        assert len(rest) == (1 if target == "reference" else 0)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="aa: token labeling supports RandAugment"):
        tl.TokenLabelTransform(32, 4, target="reference", **dict(PLAIN, auto_augment="augmix-m5"))
    with pytest.raises(ValueError, match="target"):
        tl.TokenLabelTransform(32, 4, target="dense", **PLAIN)
    with pytest.raises(TypeError):
        tl.TokenLabelTransform(32, 4, target="reference")  # augmentation values have no defaults


def test_spatial_op_matrix_matches_pil():
    """The map affine of each op maps points like PIL does on the image."""
    from timm.data.auto_augment import NAME_TO_OP
    img = position_image(64)
    for name, level in [("Rotate", 23.0), ("Rotate", -40.0), ("ShearX", 0.25), ("ShearY", -0.2),
                        ("TranslateXRel", 0.3), ("TranslateYRel", -0.25), ("TranslateX", 9.0), ("TranslateY", -7.0)]:
        out = NAME_TO_OP[name](img, level, resample=Image.NEAREST, fillcolor=(0, 0, 0))
        a, b, c, d, e, f = tl.spatial_op_matrix(name, level, 64, 64)
        src = decode(T.functional.to_tensor(out))
        ref = decode(T.functional.to_tensor(img))
        for py, px in [(10, 50), (33, 7), (40, 40), (60, 21)]:
            xin, yin = a * (px + 0.5) + b * (py + 0.5) + c, d * (px + 0.5) + e * (py + 0.5) + f
            xi, yi = math.floor(xin), math.floor(yin)
            expect = int(ref[yi, xi]) if 0 <= xi < 64 and 0 <= yi < 64 else TARGET
            assert int(src[py, px]) == expect, (name, py, px)


# ---- files: ImageFolder + generate_label -------------------------------------------------------------
def _image_folder(root, classes=("cat", "dog"), per_class=3, side=32, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((side, side, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"img_{i}.png")
    return root


def _manual_maps(model, img_path, img_size, label_size, vit):
    cfg = model.pretrained_cfg
    tf = T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize(cfg["mean"], cfg["std"])])
    x = tf(Image.open(img_path).convert("RGB"))[None]
    with torch.no_grad():
        f = model.forward_features(x)
        if vit:
            p = model.num_prefix_tokens
            h, w = model.patch_embed.grid_size
            logits = model.head(model.fc_norm(f[:, p:])).reshape(1, h, w, -1).permute(0, 3, 1, 2)
        else:  # classifier weights as a 1x1 convolution
            logits = torch.einsum("bchw,kc->bkhw", f, model.fc.weight) + model.fc.bias[None, :, None, None]
    logits = F.interpolate(logits, size=(label_size, label_size), mode="bilinear", align_corners=False)
    vals, idx = logits.topk(5, dim=1)
    return vals[0], idx[0]


@pytest.mark.parametrize("name,vit,img_size,kwargs", [
    ("test_resnet", False, 64, []),
    ("test_vit", True, 32, ["img_size=32"]),
])
def test_generate_label_cnn_and_vit(tmp_path, name, vit, img_size, kwargs):
    data = _image_folder(tmp_path / "data")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **({"img_size": 32} if vit else {})).eval()
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)  # DDP-style keys
    out = tmp_path / "labels"
    argv = ["--data", str(data), "--output", str(out), "--model", name, "--checkpoint", str(ckpt),
            "--img-size", str(img_size), "--label-size", "4", "--workers", "0", "--batch-size", "4",
            "--no-progress", "--model-kwargs", *kwargs]
    assert gl.main(argv) == 0
    files = sorted(out.rglob("*.pt"))
    assert [f.relative_to(out).as_posix() for f in files] == [f"{c}/img_{i}.pt" for c in ("cat", "dog")
                                                             for i in range(3)]
    for f in files:
        m = torch.load(f, weights_only=True)
        assert m.shape == (2, 5, 4, 4) and m.dtype == torch.float32
        vals, idx = _manual_maps(model, data / f.parent.name / (f.stem + ".png"), img_size, 4, vit)
        torch.testing.assert_close(m[0], vals, rtol=1e-4, atol=1e-4)
        assert torch.equal(m[1].long(), idx)
    # resume: only the missing file is written again; a stale temp file of a killed run is removed
    victim = out / "dog" / "img_1.pt"
    before = victim.read_bytes()
    others = {f: f.stat().st_mtime_ns for f in files if f != victim}
    victim.unlink()
    stale = out / "cat" / ".img_0.pt.tmp12345"
    stale.write_bytes(b"partial")
    assert gl.main(argv) == 0
    assert victim.exists() and not stale.exists()
    torch.testing.assert_close(torch.load(victim, weights_only=True), torch.load(__import__("io").BytesIO(before),
                                                                                  weights_only=True))
    assert all(f.stat().st_mtime_ns == t for f, t in others.items())


def test_generate_label_bad_input(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", per_class=1)
    base = ["--data", str(data), "--output", str(tmp_path / "o"), "--model", "test_resnet", "--workers", "0"]
    assert gl.main(base) == 2  # no checkpoint and no --random-init
    assert gl.main(base + ["--checkpoint", str(tmp_path / "missing.pth")]) == 2
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert gl.main(base + ["--checkpoint", str(tmp_path / "bad.pth")]) == 2
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    assert gl.main(base + ["--checkpoint", str(tmp_path / "wrong.pth")]) == 2
    assert gl.main(["--data", str(tmp_path / "nope"), "--output", "o", "--model", "test_resnet", "--random-init"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(e.startswith("generate_label.py: error:") for e in err)
    assert "Traceback" not in "".join(err)


@pytest.mark.parametrize("target", tl.TARGETS)
def test_generated_label_set_round_trips_through_dataset(tmp_path, target):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "labels"
    assert gl.main(["--data", str(data), "--output", str(out), "--model", "test_resnet", "--random-init",
                    "--model-kwargs", "num_classes=2", "--img-size", "64", "--label-size", "4", "--workers", "0",
                    "--no-progress"]) == 0
    ds = tl.build_token_label_dataset(str(data), str(out), 32, 4, target=target, **DATA_AUG, scale=(1.0, 1.0),
                                      ratio=(1.0, 1.0), hflip=0.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    norm = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    c = 2  # the teacher's top-K: K = min(5, C) = 2
    for i in range(len(ds)):
        img, (label, lm, *cls_map) = ds[i]
        path, cls = ds.samples[i]
        assert label == cls
        torch.testing.assert_close(img, norm(Image.open(path).convert("RGB")))
        raw = torch.load(tl.label_path_for(path, str(out)), weights_only=True)
        # the whole-image crop at the map's own size is the identity on the targets
        torch.testing.assert_close(tl.dense_targets(lm[None], c, target=target),
                                   tl.dense_targets(raw[None], c, target=target))
        if target == "reference":
            want = naive_reference(raw, (0, 0, 32, 32), (32, 32), 4, False, c)[1]
            torch.testing.assert_close(tl.class_logits(cls_map[0][None], c)[0].softmax(-1), want)
    x, targets = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and targets[0].shape == (4,)
    if target == "reference":
        assert targets[1].shape == (4, 2, 8, 4, 4) and targets[2].shape == (4, 2, 32, 1, 1)
    else:
        assert targets[1].shape == (4, 2, 2, 4, 4) and len(targets) == 2
    loss = tl.TokenLabelCriterion(target=target)(x, (torch.randn(4, c), torch.randn(4, 16, c), None), targets)
    assert torch.isfinite(loss)


def test_synthetic_token_labels_wrapper():
    base = [(torch.zeros(3, 8, 8), i % 3) for i in range(5)]
    ds = tl.SyntheticTokenLabels(base, num_classes=3, label_size=4, k=5, seed=1)
    img, (y, m) = ds[4]
    assert y == 1 and m.shape == (2, 3, 4, 4)  # k capped at the number of classes
    assert (m[1, 0] == 1).all() and (m[0, 0] > m[0, 1:]).all()  # image class is top-1 everywhere
    assert torch.equal(m[1].sort(0).values, torch.arange(3.0)[:, None, None].expand(3, 4, 4))
    assert torch.equal(ds[4][1][1], m) and not torch.equal(ds[3][1][1][0], m[0])  # deterministic per index
    x, (yy, mm) = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert yy.tolist() == [0, 1, 2, 0, 1] and mm.shape == (5, 2, 3, 4, 4)


# ---- bad data: one errors.DataError line naming the file, or a counted skip ---------------------------------
def _labelled_folder(tmp_path, per_class=3):
    data = _image_folder(tmp_path / "data", per_class=per_class)
    labels = tmp_path / "labels"
    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        os.makedirs(labels / c)
        for i in range(per_class):
            torch.save(random_map(2, 4, 4, 2, g), labels / c / f"img_{i}.pt")
    return data, labels


def _dataset(data, labels, skip=False):
    return tl.build_token_label_dataset(str(data), str(labels), 16, 4, target="reference", **DATA_AUG,
                                        skip_bad_images=skip)


def test_corrupt_image_is_a_data_error_or_a_counted_skip(tmp_path):
    data, labels = _labelled_folder(tmp_path)
    bad = data / "cat" / "img_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = _dataset(data, labels)
    with pytest.raises(DataError, match=f"cannot read image {bad}") as e:
        ds[1]
    assert "\n" not in str(e.value)
    # through a DataLoader worker the message is still one line
    with pytest.raises(DataError) as e:
        list(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [1]), num_workers=1))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    ds = _dataset(data, labels, skip=True)
    x, (label, *_) = ds[1]
    assert label == 0 and skipped_images(ds) == 1 and bad_images(ds) == [str(bad)]
    assert len([ds[i] for i in range(len(ds))]) == 6 and skipped_images(ds) == 2


def test_bad_label_file_is_a_data_error_or_a_counted_skip(tmp_path):
    data, labels = _labelled_folder(tmp_path)
    missing = labels / "dog" / "img_2.pt"
    os.remove(missing)
    garbled = labels / "cat" / "img_0.pt"
    garbled.write_bytes(b"not a tensor file")
    wrong = labels / "dog" / "img_0.pt"
    torch.save(torch.zeros(2, 3, 4), wrong)
    ds = _dataset(data, labels)
    for i, path, why in [(5, missing, "not found"), (0, garbled, "cannot read"), (3, wrong, "expected a tensor")]:
        with pytest.raises(DataError, match=why) as e:
            ds[i]
        assert str(path) in str(e.value) and "image" not in str(e.value).split(str(path))[0]
    skipping = _dataset(data, labels, skip=True)
    assert [skipping[i][1][0] for i in range(6)] == [0, 0, 0, 1, 1, 0]  # bad samples replaced by the next good one
    assert skipped_images(skipping) == 3 + 1  # sample 5 wraps around to 0, which is bad too
    assert sorted(bad_images(skipping)) == sorted(str(data / c / f"img_{i}.png") for c, i in
                                                  [("cat", 0), ("dog", 0), ("dog", 2)])


def test_bad_label_indices_are_named(tmp_path):
    data, labels = _labelled_folder(tmp_path)
    m = torch.load(labels / "cat" / "img_1.pt", weights_only=True)
    m[1, 0, 0, 0] = 7  # only 2 classes
    torch.save(m, labels / "cat" / "img_1.pt")
    m[1, 0, 0, 0] = m[1, 1, 0, 0]  # the same class twice at a location
    torch.save(m, labels / "cat" / "img_2.pt")
    ds = _dataset(data, labels)
    with pytest.raises(DataError, match=r"img_1.pt: class indices must be integers in \[0, 2\)"):
        ds[1]
    with pytest.raises(DataError, match="img_2.pt: a location lists the same class twice"):
        ds[2]


def test_missing_label_class_folder_or_roots_are_data_errors(tmp_path):
    data, labels = _labelled_folder(tmp_path)
    os.rename(labels / "dog", labels / "dogs")
    for skip in (False, True):  # a missing class folder means a wrong label set, not a bad file
        with pytest.raises(DataError, match=f"token label folder missing for class 'dog': {labels / 'dog'}$"):
            _dataset(data, labels, skip)
    with pytest.raises(DataError, match="token label folder not found"):
        _dataset(data, tmp_path / "nope")
    with pytest.raises(DataError, match="image folder not found"):
        _dataset(tmp_path / "nope", labels)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="empty image folder"):
        _dataset(tmp_path / "empty", labels)


# ---- end to end ---------------------------------------------------------------------------------------------
def _synthetic_label_set(root, label_root, classes, per_class, side, s, k, seed=0):
    _image_folder(root, classes, per_class, side, seed)
    g = torch.Generator().manual_seed(seed)
    for ci, c in enumerate(classes):
        os.makedirs(label_root / c, exist_ok=True)
        for i in range(per_class):
            idx = torch.stack([torch.randperm(len(classes), generator=g)[:k] for _ in range(s * s)])
            idx[idx == ci] = idx[:, :1].expand_as(idx)[idx == ci]  # swap: the image class goes to slot 0
            idx[:, 0] = ci
            m = torch.stack([torch.randn(k, s, s, generator=g) + torch.tensor([3.0] + [0.0] * (k - 1))[:, None, None],
                             idx.T.reshape(k, s, s).float()])
            torch.save(m, label_root / c / f"img_{i}.pt")


def test_short_training_with_toe_and_mixtoken(tmp_path):
    classes = ("a", "b", "c", "d")
    _synthetic_label_set(tmp_path / "img", tmp_path / "lab", classes, per_class=4, side=40, s=8, k=3)
    ds = tl.build_token_label_dataset(str(tmp_path / "img"), str(tmp_path / "lab"), 32, 8, aa="rand-m9-mstd0.5-inc1",
                                      color_jitter=0.4, interpolation="bicubic", re_prob=0.25, re_mode="pixel",
                                      re_count=1, target="reference")
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    random.seed(0)
    model = timm.create_model("lvvit_t", img_size=32, patch_size=4, num_classes=4, embed_dim=64, depth=3, num_heads=2,
                              return_dense=True, mix_token=True, drop_path_rate=0.1, toe_dense_loss="zero")
    toe.apply(model, toe.Schedule(r1=0.5, ng=2, k=2, epochs=2))
    crit = tl.TokenLabelCriterion(smoothing=0.1, ground_truth=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, kept = [], []
    for epoch in range(2):
        toe.set_epoch(model, epoch)
        model.train()
        for samples, targets in loader:
            assert len(targets) == 3
            out = model(samples)
            kept.append(None if toe.last_index(model) is None else toe.last_index(model).shape[1])
            loss = crit(samples, out, targets)
            opt.zero_grad()
            loss.backward()
            if not losses:
                missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
                assert not missing, missing
            opt.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and len(losses) == 4
    assert kept == [1 + 32, 1 + 32, None, None]  # stage 1 keeps half the tokens, stage 2 all
    model.eval()
    with torch.no_grad():
        assert model(samples).shape == (8, 4)
    # the same pipeline fits a fixed batch: the loss goes down with ToE on
    model.mix_token = False
    toe.set_epoch(model, 0)
    model.train()
    first = last = None
    for step in range(25):
        loss = crit(samples, model(samples), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.8 * first, (first, last)
