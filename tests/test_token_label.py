"""Token labeling: label-map geometry (crop / flip / spatial RandAugment against the image), the loss
against a dense manual computation, the dataset round trip, generate_label.py (CNN and ViT teachers,
resume) and a short LV-ViT + ToE training run on synthetic images and label maps."""
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

import models  # noqa: F401
import toe
import token_label as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_label", os.path.join(ROOT, "scripts", "generate_label.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gl = _load_script()

# ---- synthetic "position" map and image: class of cell (a, b) is a * G + b -------------------------
G = 8          # cells per side of the synthetic map
TARGET = G * G  # image class (used as fill outside the source)
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
    return label_map[1, 0].long()  # dense_to_topk sorts by probability


def test_topk_dense_round_trip():
    lm = position_map()
    classes, probs = tl.topk_to_dense(lm, extra_class=TARGET)
    assert TARGET in classes.tolist() and torch.allclose(probs.sum(0), torch.ones(G, G))
    back = tl.dense_to_topk(classes, probs, 5)
    torch.testing.assert_close(tl.dense_targets(back[None], NCLS), tl.dense_targets(lm[None], NCLS))
    # fewer classes than K: padded entries carry zero weight
    small = tl.dense_to_topk(torch.tensor([3, 7]), torch.tensor([[[0.25]], [[0.75]]]), 5)
    d = tl.dense_targets(small[None], 10)[0, 0]
    torch.testing.assert_close(d, torch.tensor([0, 0, 0, .25, 0, 0, 0, .75, 0, 0]))


@pytest.mark.parametrize("box", [(0, 0, 128, 128), (16, 40, 50, 70), (3, 77, 101, 45), (60, 9, 33, 33)])
def test_crop_dense_map_matches_box_geometry(box):
    """Each output cell's top-1 class is the class of the source cell under its bin centre."""
    _, probs = tl.topk_to_dense(position_map())
    classes, _ = tl.topk_to_dense(position_map())
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
        x, lm = tf(img, position_map(), TARGET)
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


def test_random_crop_and_flip_consistent_with_image():
    tf = tl.TokenLabelTransform(input_size=64, label_size=G, auto_augment=None, color_jitter=0.0,
                                interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1), re_prob=0.0,
                                scale=(0.2, 1.0), hflip=0.5)
    assert _consistency(tf, range(12)) == 1.0


def test_spatial_randaugment_consistent_with_image():
    # full-image crop so label cells coincide with the source cells; only the spatial ops, always applied
    tf = tl.TokenLabelTransform(input_size=64, label_size=G, auto_augment="rand-m9-n2-mstd0.5-p1.0",
                                interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1), re_prob=0.0,
                                scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5,
                                ra_transforms=list(tl.SPATIAL_OPS[:3]) + ["TranslateXRel", "TranslateYRel"])
    assert _consistency(tf, range(30)) >= 0.97
    # and the map really moved: a rotated map differs from the identity map
    random.seed(0)
    lm = tf(position_image(128), position_map(), TARGET)[1]
    assert not torch.equal(top1(lm), top1(position_map()))


def test_full_randaugment_survives_max_magnitude():
    """m10 with mstd noise reaches PosterizeIncreasing's 0 bits, which Pillow >= 13 rejects."""
    tf = tl.TokenLabelTransform(input_size=32, label_size=G, auto_augment="rand-m10-n4-mstd0.5-inc1-p1.0",
                                re_prob=0.0, ra_transforms=["PosterizeIncreasing", "SolarizeIncreasing", "Rotate"])
    for seed in range(8):
        random.seed(seed)
        x, lm = tf(position_image(64), position_map(), TARGET)
        assert x.shape == (3, 32, 32) and lm.shape == (2, 5, G, G) and torch.isfinite(x).all()


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


def test_loss_matches_dense_manual_computation():
    g = torch.Generator().manual_seed(0)
    b, s, c = 4, 3, 12
    cls = torch.randn(b, c, generator=g)
    aux = torch.randn(b, s * s, c, generator=g)
    idx = torch.stack([torch.randperm(c, generator=g)[:5] for _ in range(b * s * s)])
    lmap = torch.stack([torch.randn(b, 5, s, s, generator=g),
                        idx.reshape(b, s, s, 5).permute(0, 3, 1, 2).float()], 1)
    y = torch.tensor([0, 5, 7, 11])
    mask = torch.rand(b, s * s, generator=g) > 0.3
    box = (0, 1, 2, 3)  # area 4 of 9
    eps = 0.1
    crit = tl.TokenLabelCriterion(cls_weight=0.7, dense_weight=0.5, smoothing=eps)
    # manual: full C-dimensional targets
    onehot = F.one_hot(y, c).float() * (1 - eps) + eps / c
    lam = 1 - 4 / 9
    t_cls = lam * onehot + (1 - lam) * onehot.flip(0)
    loss_cls = -(t_cls * cls.log_softmax(-1)).sum(-1).mean()
    dense = torch.zeros(b, s * s, c)
    p = lmap[:, 0].softmax(1)
    for bi in range(b):
        for pos in range(s * s):
            for k in range(5):
                dense[bi, pos, int(lmap[bi, 1, k].flatten()[pos])] += p[bi, k].flatten()[pos]
    dense = dense * (1 - eps) + eps / c
    ce = -(dense * aux.log_softmax(-1)).sum(-1)
    loss_dense = ce[mask].mean()
    got = crit(torch.zeros(1), (cls, aux, box, mask), (y, lmap))
    torch.testing.assert_close(got, 0.7 * loss_cls + 0.5 * loss_dense)
    torch.testing.assert_close(tl.dense_targets(lmap, c, eps), dense)
    # no box / no mask: plain means; soft class targets are used as given
    got = crit(None, (cls, aux, None), (t_cls, lmap))
    torch.testing.assert_close(got, 0.7 * -(t_cls * cls.log_softmax(-1)).sum(-1).mean() + 0.5 * ce.mean())
    with pytest.raises(ValueError, match="token-label-size"):
        crit(None, (cls, aux[:, :4], None), (y, lmap))
    with pytest.raises(ValueError, match="out of range"):
        crit(None, (cls[:, :5], aux[..., :5], None), (y.clamp(max=4), lmap))
    with pytest.raises(TypeError, match="return_dense"):
        crit(None, cls, (y, lmap))


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


def test_generated_label_set_round_trips_through_dataset(tmp_path):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "labels"
    assert gl.main(["--data", str(data), "--output", str(out), "--model", "test_resnet", "--random-init",
                    "--model-kwargs", "num_classes=9", "--img-size", "64", "--label-size", "4", "--workers", "0",
                    "--no-progress"]) == 0
    ds = tl.build_token_label_dataset(str(data), str(out), input_size=32, label_size=4, auto_augment=None,
                                      color_jitter=0.0, re_prob=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    norm = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    for i in range(len(ds)):
        img, (target, lm) = ds[i]
        path, cls = ds.samples[i]
        assert target == cls
        torch.testing.assert_close(img, norm(Image.open(path).convert("RGB")))
        raw = torch.load(tl.label_path_for(path, str(out)), weights_only=True)
        torch.testing.assert_close(tl.dense_targets(lm[None], 9), tl.dense_targets(raw[None], 9))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x, (y, maps) = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,) and maps.shape == (4, 2, 5, 4, 4)
    # a missing label file is named in the error
    os.remove(out / "dog" / "img_2.pt")
    with pytest.raises(FileNotFoundError, match="img_2.pt"):
        ds[5]
    with pytest.raises(FileNotFoundError, match="no folder for class"):
        tl.TokenLabelImageFolder(str(data), str(tmp_path))
    with pytest.raises(ValueError, match="RandAugment"):
        tl.TokenLabelTransform(auto_augment="augmix-m5")


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


def _synthetic_label_set(root, label_root, classes, per_class, side, s, k, seed=0):
    _image_folder(root, classes, per_class, side, seed)
    g = torch.Generator().manual_seed(seed)
    for ci, c in enumerate(classes):
        os.makedirs(label_root / c, exist_ok=True)
        for i in range(per_class):
            idx = torch.stack([torch.randperm(len(classes), generator=g)[:k] for _ in range(s * s)])
            idx[:, 0] = ci  # the image class dominates most locations
            m = torch.stack([torch.randn(k, s, s, generator=g) + torch.tensor([3.0] + [0.0] * (k - 1))[:, None, None],
                             idx.T.reshape(k, s, s).float()])
            torch.save(m, label_root / c / f"img_{i}.pt")


def test_short_training_with_toe_and_mixtoken(tmp_path):
    classes = ("a", "b", "c", "d")
    _synthetic_label_set(tmp_path / "img", tmp_path / "lab", classes, per_class=4, side=40, s=8, k=3)
    ds = tl.build_token_label_dataset(str(tmp_path / "img"), str(tmp_path / "lab"), input_size=32, label_size=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    random.seed(0)
    model = timm.create_model("lvvit_t", img_size=32, patch_size=4, num_classes=4, embed_dim=64, depth=3, num_heads=2,
                              return_dense=True, mix_token=True, drop_path_rate=0.1)
    toe.apply(model, toe.Schedule(r1=0.5, ng=2, k=2, epochs=2))
    crit = tl.TokenLabelCriterion(cls_weight=1.0, dense_weight=0.5, smoothing=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, kept = [], []
    for epoch in range(2):
        toe.set_epoch(model, epoch)
        model.train()
        for samples, targets in loader:
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
    assert last < 0.7 * first, (first, last)
