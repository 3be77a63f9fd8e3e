"""LV-ViT model: registry and parameter counts, an independent functional reference, MixToken un-mixing,
and the dense (token-labeling) outputs under Token Expansion."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers lvvit_*)
import toe
from models import lvvit as lv
from token_label import TokenLabelCrossEntropy, dense_targets

TINY = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=3, num_heads=2)


def tiny(**kw):
    torch.manual_seed(0)
    return timm.create_model("lvvit_s", **dict(TINY, **kw))


def random_label_map(b, s, num_classes, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_classes, generator=g)[:k] for _ in range(b * s * s)])
    idx = idx.reshape(b, s, s, k).permute(0, 3, 1, 2).float()
    logits = torch.randn(b, k, s, s, generator=g) * 2
    return torch.stack([logits, idx], 1)  # [B, 2, K, S, S]


@pytest.mark.parametrize("name,depth,dim,heads,skip_lam,params", [
    ("lvvit_t", 12, 240, 4, 1.0, 8.53),
    ("lvvit_s", 16, 384, 6, 2.0, 26.15),
    ("lvvit_m", 20, 512, 8, 2.0, 55.83),
])
def test_param_counts_and_config(name, depth, dim, heads, skip_lam, params):
    with torch.device("meta"):  # counts only: no allocation, no init cost
        m = timm.create_model(name)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - params) <= 0.01, (name, n)
    assert round(n, 2) == params
    assert len(m.blocks) == depth and m.embed_dim == dim
    blk = m.blocks[0]
    assert blk.attn.num_heads == heads and blk.skip_lam == skip_lam
    assert blk.attn.qkv.bias is None  # qkv_bias False
    assert blk.mlp.fc1.out_features == 3 * dim  # mlp ratio 3
    stem = m.patch_embed.stem
    assert [c.kernel_size for c in stem if isinstance(c, torch.nn.Conv2d)] == [(7, 7), (3, 3), (3, 3)]
    assert stem[0].stride == (2, 2) and stem[0].out_channels == 64
    assert m.patch_embed.proj.kernel_size == (8, 8) and m.patch_embed.proj.stride == (8, 8)
    assert m.num_prefix_tokens == 1 and m.patch_embed.num_patches == 196


def test_lvvit_l_and_timm_api():
    with torch.device("meta"):
        m = timm.create_model("lvvit_l")
    assert m.patch_embed.stem[0].out_channels == 128 and m.blocks[0].skip_lam == 3.0
    assert m.pretrained_cfg["input_size"] == (3, 288, 288)
    assert {"lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"} <= set(timm.list_models("lvvit_*"))
    t = tiny()
    assert t.no_weight_decay() == {"pos_embed", "cls_token"}
    assert t.pretrained_cfg["classifier"] == ("head", "aux_head") and t.default_cfg is not None
    t.reset_classifier(3)
    assert t.head.out_features == 3 and t.aux_head.out_features == 3 and t.num_classes == 3
    assert t.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="toe_dense_loss"):
        tiny(toe_dense_loss="zeros")


@pytest.mark.parametrize("name,crop_pct,size", [("lvvit_t", 0.9, 224), ("lvvit_s", 0.9, 224), ("lvvit_m", 1.0, 224),
                                                ("lvvit_l", 1.0, 288)])
def test_pretrained_cfg_eval_crop_and_classifiers(name, crop_pct, size):
    with torch.device("meta"):
        m = timm.create_model(name, num_classes=7)
    cfg = m.pretrained_cfg
    assert cfg["crop_pct"] == crop_pct and cfg["input_size"] == (3, size, size)
    # every layer sized to the classes is listed, so fine-tuning re-initialises both heads
    sized = {n.rsplit(".", 1)[0] for n, p in m.named_parameters() if p.shape[0] == 7}
    assert set(cfg["classifier"]) == sized == {"head", "aux_head"}


def _reference_forward(m, x):
    """LV-ViT eval forward written with functional ops from the parameters only."""
    sd = m.state_dict()
    h = x
    for i in (0, 3, 6):  # conv -> BN(eval) -> ReLU, three times
        conv = m.patch_embed.stem[i]
        h = F.conv2d(h, sd[f"patch_embed.stem.{i}.weight"], stride=conv.stride, padding=conv.padding)
        h = F.batch_norm(h, sd[f"patch_embed.stem.{i + 1}.running_mean"], sd[f"patch_embed.stem.{i + 1}.running_var"],
                         sd[f"patch_embed.stem.{i + 1}.weight"], sd[f"patch_embed.stem.{i + 1}.bias"], False)
        h = F.relu(h)
    h = F.conv2d(h, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=m.patch_embed.proj.stride)
    t = h.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], 1) + sd["pos_embed"]
    d = t.shape[-1]
    for bi, blk in enumerate(m.blocks):
        p = f"blocks.{bi}."
        nh = blk.attn.num_heads
        y = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        q, k, v = (y @ sd[p + "attn.qkv.weight"].T).reshape(y.shape[0], y.shape[1], 3, nh, d // nh).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) * (d // nh) ** -0.5).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape_as(t) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        t = t + y / blk.skip_lam
        y = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        t = t + (y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]) / blk.skip_lam
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"])
    cls = t[:, 0] @ sd["head.weight"].T + sd["head.bias"]
    aux = t[:, 1:] @ sd["aux_head.weight"].T + sd["aux_head.bias"]
    return cls, aux


def test_forward_matches_functional_reference():
    m = tiny(skip_lam=2.0).eval()
    for bn in m.patch_embed.stem:  # non-trivial running stats
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 32, 32)
    cls, aux = _reference_forward(m, x)
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, cls + 0.5 * aux.max(1)[0], rtol=1e-4, atol=1e-4)
    # training without return_dense gives the same formula (no dropout configured)
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), out)


def _fixed_box(monkeypatch, box):
    monkeypatch.setattr(lv, "mixtoken_box", lambda h, w, lam=None, generator=None: box)


def test_mixtoken_unmix_restores_positions(monkeypatch):
    box = (1, 2, 5, 7)  # rows 1..4, cols 2..6 of the 8x8 grid
    _fixed_box(monkeypatch, box)
    x = torch.randn(5, 3, 32, 32)  # odd batch: the middle sample is paired with itself
    # depth 0: each aux position depends only on its own patch, so un-mixing must give the unmixed output
    m0 = tiny(depth=0, return_dense=True, mix_token=True).train()
    ref0 = copy.deepcopy(m0)
    ref0.mix_token = False
    with torch.no_grad():
        o, r = m0(x), ref0(x)
    assert o.bbox == box and r.bbox is None
    torch.testing.assert_close(o.aux, r.aux)
    # depth 3: compare with a hand-mixed forward and hand un-mixing
    m = tiny(return_dense=True, mix_token=True).train()
    with torch.no_grad():
        out = m(x)
        grid = m.patch_embed(x)
        mixed = grid.clone()
        for b in range(5):
            mixed[b, :, 1:5, 2:7] = grid[4 - b, :, 1:5, 2:7]
        t = m.norm(m.blocks(m._tokens(mixed)))
        aux = m.aux_head(t[:, 1:]).reshape(5, 8, 8, -1)
        cls = m.head(t[:, 0])
    expect = aux.clone()
    for b in range(5):
        expect[b, 1:5, 2:7] = aux[4 - b, 1:5, 2:7]
    torch.testing.assert_close(out.aux, expect.reshape(5, 64, -1))
    torch.testing.assert_close(out.cls, cls)
    # the class target is mixed with lam = 1 - area / M
    crit = TokenLabelCrossEntropy(cls_weight=1.0, dense_weight=0.0, smoothing=0.0, target="topk")
    y = torch.tensor([0, 1, 2, 3, 4])
    lam = 1 - 20 / 64
    t_mix = lam * F.one_hot(y, 10).float() + (1 - lam) * F.one_hot(y.flip(0), 10).float()
    expected = -(t_mix * out.cls.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(crit(out, (y, random_label_map(5, 8, 10))), expected)


def test_mixtoken_box_bounds():
    g = torch.Generator().manual_seed(1)
    areas = []
    for _ in range(300):
        t, l, b, r = lv.mixtoken_box(14, 14, generator=g)
        assert 0 <= t <= b <= 14 and 0 <= l <= r <= 14
        areas.append((b - t) * (r - l) / 196)
    assert 0.2 < sum(areas) / len(areas) < 0.5  # lam ~ U(0,1), clipped at the border
    t, l, b, r = lv.mixtoken_box(14, 14, lam=1.0, generator=g)
    assert (b - t) * (r - l) == 0  # lam = 1: nothing mixed


def test_dense_loss_keep_rate_one_equals_no_toe():
    m = tiny(return_dense=True, mix_token=True).train()
    plain = copy.deepcopy(m)
    toe.apply(m, toe.Schedule(r1=0.5, ng=2, k=2, epochs=2))
    toe.set_epoch(m, 1)  # last stage: keep rate 1
    x = torch.randn(4, 3, 32, 32)
    y = (torch.tensor([1, 2, 3, 4]), random_label_map(4, 8, 10))
    crit = TokenLabelCrossEntropy(dense_weight=0.5, smoothing=0.1)
    torch.manual_seed(3)
    o1 = m(x)
    torch.manual_seed(3)
    o2 = plain(x)
    assert toe.last_assignment(m) is None and o1.mask is None and o1.bbox == o2.bbox
    torch.testing.assert_close(crit.dense_loss(o1.aux, y[1]), crit.dense_loss(o2.aux, y[1]), rtol=0, atol=0)
    torch.testing.assert_close(crit(o1, y), crit(o2, y), rtol=0, atol=0)


def _run_with_capture(m, x, hook_layer=1):
    """Forward m (ToE applied at ``hook_layer``) capturing the raw block input and the per-token aux logits."""
    cap = {}
    # registered after ToE's hook -> sees the reduced sequence; prepend=True -> sees the raw one
    h1 = m.blocks[hook_layer].register_forward_pre_hook(lambda mod, a: cap.__setitem__("raw", a[0].detach()),
                                                        prepend=True)
    # the first aux_head call is the per-token one ('zero' mode calls it again on a zero feature)
    h2 = m.aux_head.register_forward_hook(lambda mod, a, o: None if "tok" in cap else cap.update(tok=o.detach()))
    try:
        out = m(x)
    finally:
        h1.remove()
        h2.remove()
    return out, cap


@pytest.mark.parametrize("mode", ["merged", "kept", "zero"])
def test_dense_targets_follow_toe_assignment(monkeypatch, mode):
    box = (0, 3, 4, 8)
    _fixed_box(monkeypatch, box)
    m = tiny(return_dense=True, mix_token=True, toe_dense_loss=mode).train()
    toe.apply(m, toe.Schedule(r1=0.4, ng=3, k=2, epochs=3))
    toe.set_epoch(m, 0)
    x = torch.randn(4, 3, 32, 32)
    out, cap = _run_with_capture(m, x)
    B, M, P = 4, 64, 1
    index = toe.last_index(m)
    kept = index[:, P:] - P  # original positions of the kept tokens, in slot order
    n = kept.shape[1]
    assert n == int(0.4 * M + 1e-6) and cap["tok"].shape == (B, n, 10)  # stage 1 keeps r1*M tokens
    # independent representative: own token if kept, else the kept token closest in cosine (Eq. 7)
    raw = F.normalize(cap["raw"][:, P:].float(), dim=-1)
    rep_mixed = torch.empty(B, M, 10)
    own_kept = torch.zeros(B, M, dtype=torch.bool)
    for b in range(B):
        kept_list = kept[b].tolist()
        for i in range(M):
            if i in kept_list:
                j = kept_list.index(i)
                own_kept[b, i] = True
            else:
                j = int((raw[b, kept[b]] @ raw[b, i]).argmax())
            rep_mixed[b, i] = cap["tok"][b, j] if mode != "zero" or own_kept[b, i] else m.aux_head.bias.detach()
    # un-mix MixToken: positions inside the box come from the batch-flipped row
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[box[0]:box[2], box[1]:box[3]] = True
    inside = inside.flatten()
    expect = torch.where(inside[None, :, None], rep_mixed.flip(0), rep_mixed)
    torch.testing.assert_close(out.aux.detach(), expect)
    if mode in ("merged", "zero"):
        assert out.mask is None
        exp_mask = torch.ones(B, M, dtype=torch.bool)
        if mode == "zero":  # removed positions: the bias (0 at init), after un-mixing too; still supervised
            assert int((out.aux.abs().sum(-1) == 0).sum()) == B * (M - n)
    else:
        exp_mask = torch.where(inside[None], own_kept.flip(0), own_kept)
        assert torch.equal(out.mask, exp_mask) and int(exp_mask.sum()) == B * n
    # the dense loss compares each position's target with that token's logits
    lmap = random_label_map(B, 8, 10, seed=4)
    t = dense_targets(lmap, 10, smoothing=0.1)
    ce = -(t * expect.log_softmax(-1)).sum(-1)
    manual = (ce * exp_mask).sum() / exp_mask.sum()
    crit = TokenLabelCrossEntropy(dense_weight=1.0, smoothing=0.1)
    torch.testing.assert_close(crit.dense_loss(out.aux, lmap, out.mask), manual)
    # gradients reach every parameter through the reduced sequence and the gather
    crit(out, (torch.arange(B), lmap)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_dropped_positions_are_masked_not_zero_filled():
    m = tiny(return_dense=True).train()
    toe.apply(m, toe.Schedule(r1=0.5, ng=3, k=2, epochs=3), merge=False)
    toe.set_epoch(m, 0)
    out = m(torch.randn(2, 3, 32, 32))
    assign = toe.last_assignment(m)
    assert out.mask is not None and torch.equal(out.mask, assign >= 0)
    assert int(out.mask.sum()) == 2 * int(0.5 * 64)
    assert (out.aux.abs().sum(-1) > 0).all()  # no zero-filled logits anywhere


def test_zero_mode_with_merging_off_supervises_dropped_positions_as_zeros():
    m = tiny(return_dense=True, toe_dense_loss="zero").train()
    toe.apply(m, toe.Schedule(r1=0.5, ng=3, k=2, epochs=3), merge=False)
    toe.set_epoch(m, 0)
    out = m(torch.randn(2, 3, 32, 32))
    kept = torch.zeros(2, 64, dtype=torch.bool)
    kept.scatter_(1, toe.last_index(m)[:, 1:] - 1, True)
    assert out.mask is None and int(kept.sum()) == 2 * 32
    assert torch.equal(out.aux.abs().sum(-1) > 0, kept)


def test_zero_mode_is_the_aux_head_of_zero_features_and_trains_its_bias():
    """Official ToE LV-ViT: removed positions get zero features after the final norm, then aux_head, so their
    logits are aux_head.bias and their loss reaches the bias. Checked against a hand computation."""
    m = tiny(return_dense=True, toe_dense_loss="zero").train()
    with torch.no_grad():
        m.aux_head.bias.copy_(torch.linspace(-1.0, 1.0, 10))
    toe.apply(m, toe.Schedule(r1=0.4, ng=3, k=2, epochs=3))
    toe.set_epoch(m, 0)
    cap = {}
    h = m.norm.register_forward_hook(lambda mod, a, o: cap.__setitem__("feat", o))
    x = torch.randn(3, 3, 32, 32)
    try:
        out = m(x)
    finally:
        h.remove()
    B, M, P = 3, 64, 1
    own = toe.last_index(m)[:, P:] - P  # original positions of the kept tokens, in slot order
    feat = torch.zeros(B, M, 64)
    for b in range(B):
        for j, i in enumerate(own[b].tolist()):
            feat[b, i] = cap["feat"][b, P + j].detach()
    w, bias = m.aux_head.weight.detach(), m.aux_head.bias.detach()
    hand = feat @ w.T + bias
    assert out.mask is None
    torch.testing.assert_close(out.aux.detach(), hand)
    removed = torch.ones(B, M, dtype=torch.bool)
    removed.scatter_(1, own, False)
    assert int(removed.sum()) == B * (M - own.shape[1]) > 0
    assert torch.equal(out.aux.detach()[removed], bias.expand(int(removed.sum()), -1))
    # d(mean soft CE)/d bias = mean over all B*M positions of (softmax(logits) - target), removed ones included
    lmap = random_label_map(B, 8, 10, seed=5)
    crit = TokenLabelCrossEntropy(cls_weight=0.0, dense_weight=1.0, smoothing=0.1)
    crit.dense_loss(out.aux, lmap, out.mask).backward()
    t = dense_targets(lmap, 10, smoothing=0.1)
    grad = (hand.softmax(-1) - t).reshape(-1, 10).mean(0)
    torch.testing.assert_close(m.aux_head.bias.grad, grad)
    grad_kept_only = ((hand.softmax(-1) - t) * (~removed).unsqueeze(-1)).reshape(-1, 10).mean(0)
    assert not torch.allclose(m.aux_head.bias.grad, grad_kept_only, atol=1e-4)  # removed positions count


def test_spread_to_positions_validation():
    aux = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="mode"):
        lv.spread_to_positions(aux, torch.ones(1, 4, dtype=torch.long), 1, "zeros")
    for mode in ("kept", "zero"):
        with pytest.raises(ValueError, match="kept_index"):
            lv.spread_to_positions(aux, torch.ones(1, 4, dtype=torch.long), 1, mode)


def test_grad_checkpointing_keeps_toe():
    m = tiny(return_dense=True).train()
    m.set_grad_checkpointing(True)
    toe.apply(m, toe.Schedule(r1=0.5, ng=3, k=2, epochs=3))
    toe.set_epoch(m, 0)
    out, cap = _run_with_capture(m, torch.randn(2, 3, 32, 32))
    assert cap["tok"].shape[1] == 32 and out.aux.shape == (2, 64, 10)
    out.aux.sum().backward()
    assert m.pos_embed.grad is not None
