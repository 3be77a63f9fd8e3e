"""Mixed precision, accumulation and two processes: the fp16 GradScaler step with clipping against an fp32
reference, the EMA under accumulation, bitwise resume under --amp bf16/fp16 with --grad-accum-steps 2, the
learning rate and GFLOPs that main.py logs under 2 gloo ranks with accumulation (cosine + warm-up and the thop
closed form written here), 2 ranks x 2 micro-batches against a one-process hand-run of the same data, and a NaN
on one rank stopping both."""
from __future__ import annotations

import copy
import json
import math
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
from conftest import ROOT, TINY, child_env, read_log, run_main
from test_training_flags import kill_then_resume_matches

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# the tiny ViT of conftest.TINY without its learning-rate settings (these tests set their own)
VIT = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--model-kwargs", "patch_size=4", "depth=3",
       "embed_dim=64", "num_heads=2", "--device", "cpu", "--num_workers", "0", "--drop-path", "0.0"]
DIM, DEPTH, PATCHES, CLASSES, PATCH = 64, 3, 64, 10, 4


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 5))


def _batches(n: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _ce(samples, outputs, targets):
    return F.cross_entropy(outputs, targets)


# ------------------------------------------------------------------------------------------ fp16 + clip
def test_fp16_gradscaler_clipped_step_matches_fp32_reference():
    """One fp16-autocast step with GradScaler and --clip-grad: the update equals the fp32 clipped update within
    fp16 precision. Clipping the still-scaled gradients (no unscale_ first) would shrink the step by the scale
    (2^12 here); not clipping would make it ~35x larger. fp16 autocast runs on CPU in this torch."""
    model = _mlp()
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), = _batches(16, 16)
    lr, max_norm = 0.1, 0.02
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    stats = engine.train_one_epoch(model, _ce, [(x, y)], opt, torch.device("cpu"), 0, amp_dtype=torch.float16,
                                   scaler=scaler, max_norm=max_norm, print_freq=100)
    assert stats["optimizer_steps"] == 1

    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))  # fp32 reference
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    assert norm > 20 * max_norm  # clipping really acts (about 35x)
    coef = max_norm / (norm + 1e-6)
    for p, p0, g in zip(model.parameters(), before, grads):
        expected = -lr * coef * g
        torch.testing.assert_close(p.detach() - p0, expected, rtol=0.03, atol=0.01 * expected.abs().max().item())
    step = torch.sqrt(sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(model.parameters(), before)))
    assert step.item() == pytest.approx(lr * max_norm, rel=0.01)
    assert scaler.get_scale() == 2.0 ** 12  # finite gradients: no back-off, and no growth before 2000 steps


def test_fp16_overflow_skips_the_step_and_backs_off_the_scale():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # scaled fp16 gradients overflow
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = engine.train_one_epoch(model, _ce, _batches(16, 16), opt, torch.device("cpu"), 0,
                                   amp_dtype=torch.float16, scaler=scaler, max_norm=1.0, print_freq=100)
    assert np.isfinite(stats["loss"])  # the loss itself is finite: no NaN stop
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the step was skipped
    assert scaler.get_scale() == 2.0 ** 39  # backoff_factor 0.5
    assert all(p.grad is None for p in model.parameters())  # gradients cleared for the next group


# ------------------------------------------------------------------------------------ EMA and accumulation
def test_ema_updates_once_per_optimizer_step_under_accumulation():
    """5 micro-batches with --grad-accum-steps 2 give 3 optimizer steps (the last group is one micro-batch);
    the EMA (decay 0.5) is updated after each step only: ema_k = 0.5 ema_{k-1} + 0.5 w_k."""
    from timm.utils import ModelEmaV3

    model = _mlp()
    ema = ModelEmaV3(model, decay=0.5)
    batches = _batches(40, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    stats = engine.train_one_epoch(model, _ce, batches, opt, torch.device("cpu"), 0, model_ema=ema,
                                   grad_accum_steps=2, print_freq=100)
    assert stats["optimizer_steps"] == 3

    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    ema_ref = [p.detach().clone() for p in ref.parameters()]
    for group in (batches[0:2], batches[2:4], batches[4:5]):
        ref_opt.zero_grad()
        x, y = torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group])
        F.cross_entropy(ref(x), y).backward()  # equal micro-batches: the group mean is the mean loss
        ref_opt.step()
        ema_ref = [0.5 * e + 0.5 * p.detach() for e, p in zip(ema_ref, ref.parameters())]
    for got, want in zip(ema.module.parameters(), ema_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_resume_is_bitwise_under_amp_and_accumulation(amp, tmp_path):
    """Killed at iteration 3 of epoch 1 (mid accumulation group: 4 micro-batches, groups of 2) and resumed: the
    same weights, EMA, optimizer and GradScaler state (fp16; bf16 has none) as the uninterrupted run."""
    args = TINY + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "16", "--epochs", "2",
                   "--amp", amp, "--grad-accum-steps", "2", "--model-ema-decay", "0.9", "--print-freq", "1"]
    ref, _ = kill_then_resume_matches(args, tmp_path)
    if amp == "fp16":
        assert ref["scaler"] is not None and ref["scaler"]["scale"] > 0
    else:
        assert ref["scaler"] is None


# ------------------------------------------------------------------------- lr and GFLOPs under 2 ranks
def _cosine_warmup_lr(epoch: int, base: float, warmup_lr: float, warmup_epochs: int, min_lr: float,
                      epochs: int) -> float:
    """The lr in force during ``epoch`` for timm's CosineLRScheduler stepped per epoch with step(epoch + 1):
    linear from warmup_lr at epoch 0 to base at warmup_epochs, then cosine from base (at t = 0) to min_lr."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


def _vit_forward_macs(tokens_after_layer: int, layer: int = 1) -> dict:
    """Forward MACs of one image through the tiny timm ViT, in closed form, split into what thop counts and the
    attention products it does not. Block ``layer`` and later see ``tokens_after_layer`` tokens (CLS included).

    thop's rules (test_thop_rules_assumed_by_the_closed_form): nn.Linear = in_features x output elements (no
    bias), Conv2d = output elements x C_in x k x k (no bias), LayerNorm with affine = 4 x elements (toe.flops
    applies nn.LayerNorm's rule to timm's LayerNorm subclass, as the paper's timm used nn.LayerNorm), nn.GELU,
    Dropout, Identity = 0, and the functional q @ k^T and attn @ v (F.scaled_dot_product_attention) = 0."""
    hidden = 4 * DIM
    counted = PATCHES * DIM * 3 * PATCH * PATCH  # patch embedding conv
    attention = 0
    for block in range(DEPTH):
        n = 1 + PATCHES if block < layer else tokens_after_layer
        counted += 2 * 4 * n * DIM  # norm1, norm2
        counted += n * DIM * 3 * DIM + n * DIM * DIM  # qkv, proj
        counted += n * DIM * hidden + n * hidden * DIM  # fc1, fc2
        attention += 2 * n * n * DIM  # q @ k^T and attn @ v over all heads
    counted += 4 * tokens_after_layer * DIM  # final norm
    counted += DIM * CLASSES  # head on the CLS token
    return {"thop": counted, "attention_products": attention}


def test_thop_rules_assumed_by_the_closed_form():
    from timm.models.vision_transformer import Attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import thop

    def count(module, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return thop.profile(copy.deepcopy(module), inputs=(x,), verbose=False)[0]

    n = 17
    x = torch.randn(1, n, DIM)
    assert count(nn.LayerNorm(DIM), x) == 4 * n * DIM
    assert count(nn.GELU(), x) == 0
    assert count(nn.Linear(DIM, 3 * DIM), x) == n * DIM * 3 * DIM
    attn = Attention(DIM, num_heads=2, qkv_bias=True)
    for fused in (True, False):
        attn.fused_attn = fused
        assert count(attn, x) == n * DIM * 3 * DIM + n * DIM * DIM  # qkv + proj; the products count zero
    conv = nn.Conv2d(3, DIM, PATCH, PATCH)
    assert count(conv, torch.randn(1, 3, 32, 32)) == PATCHES * DIM * 3 * PATCH * PATCH


@pytest.mark.slow
def test_lr_and_gflops_logged_under_two_ranks_with_accumulation(tmp_path):
    """torchrun, 2 gloo ranks, --grad-accum-steps 2, --batch-size 8, no --unscale-lr, 2 warm-up epochs: the
    global batch is 8 x 2 x 2 = 32, so train_lr follows cosine + warm-up from lr x 32 / 512, and
    gflops_per_iter is the thop closed form x 3 x 32 at each epoch's ToE stage."""
    out = tmp_path / "lr"
    lr, warmup_lr, min_lr, epochs, warmup = 1e-3, 1e-5, 2e-6, 3, 2
    args = VIT + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "8", "--grad-accum-steps", "2",
                  "--epochs", str(epochs), "--lr", str(lr), "--warmup-epochs", str(warmup), "--warmup-lr",
                  str(warmup_lr), "--min-lr", str(min_lr), "--toe-r1", "0.5", "--toe-ng", "3", "--no-model-ema",
                  "--output_dir", str(out)]
    proc = run_main(args, launcher=TORCHRUN, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    global_batch = 8 * 2 * 2
    base = lr * global_batch / 512
    saved = json.loads((out / "args.json").read_text())
    assert saved["global_batch"] == global_batch and saved["lr_scaled"] == pytest.approx(base, rel=1e-12)
    rows = read_log(out / "log.txt")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        e = r["epoch"]
        assert r["train_lr"] == pytest.approx(_cosine_warmup_lr(e, base, warmup_lr, warmup, min_lr, epochs),
                                              rel=1e-9), (e, r["train_lr"])
        tokens = 1 + math.floor([0.5, 0.75, 1.0][e] * PATCHES + 1e-9)  # stage e + 1 of ng = 3
        macs = _vit_forward_macs(tokens)
        assert r["toe_tokens"] == tokens - 1
        # exact: what thop counts (no attention products), x 3 passes x global batch
        assert r["gflops_per_iter"] == pytest.approx(macs["thop"] * 3 * global_batch / 1e9, rel=1e-12)
        full = (macs["thop"] + macs["attention_products"]) * 3 * global_batch / 1e9
        assert r["gflops_per_iter"] < full


# ------------------------------------------------------------------------------ 2 ranks vs a hand-run
def _init_checkpoint(path: Path) -> dict:
    import timm

    torch.manual_seed(11)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=CLASSES, img_size=32, patch_size=PATCH,
                              depth=DEPTH, embed_dim=DIM, num_heads=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return state


def _rank_micro_batches(args: list, seed: int, rank: int, world: int, batch: int) -> list:
    """The micro-batches rank ``rank`` trained on in epoch 0, rebuilt in this process: DistributedSampler's
    order (a permutation drawn from seed + epoch, dealt round-robin to the ranks) and the augmentation drawn
    from the rank's epoch seed, numpy's SeedSequence of (seed, rank, epoch)."""
    import random

    import config
    import datasets
    import main

    cfg = config.from_args(main.get_args_parser().parse_args(args))
    train, _ = datasets.build_dataset(True, cfg.data.spec, datasets.build_transform(True, cfg.data.aug))
    g = torch.Generator()
    g.manual_seed(seed + 0)
    order = torch.randperm(len(train), generator=g).tolist()[rank::world]
    epoch_seed = int(np.random.SeedSequence([seed, rank, 0]).generate_state(1)[0])
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    items = [train[i] for i in order]  # transforms draw in sample order, as a loader without workers does
    return [(torch.stack([im for im, _ in items[i:i + batch]]), torch.tensor([t for _, t in items[i:i + batch]]))
            for i in range(0, len(items) - batch + 1, batch)]


@pytest.mark.slow
def test_two_ranks_with_accumulation_equal_a_hand_run_of_their_micro_batches(tmp_path):
    """Why not "2 ranks x accumulation 2 == 1 rank x twice the micro-batch" through main.py: the two runs never
    see the same data. One process samples with a RandomSampler from the global generator, two ranks with
    DistributedSampler's permutation of (seed + epoch) dealt round-robin (with repeated augmentation, the
    RASampler stream is dealt to a different number of ranks), and every rank draws its augmentation from its
    own (seed, rank, epoch) seed, so an image is cropped and flipped differently on rank 1 than in one process.

    The strongest property that holds: the 2-rank run ends with the weights of a one-process hand-run of
    exactly the micro-batches the ranks drew, one SGD step per accumulation group on the concatenation of
    2 ranks x 2 micro-batches (the global batch of 32), i.e. DDP's averaged gradient over ranks and the
    accumulated mean over micro-batches together equal one large batch."""
    init = _init_checkpoint(tmp_path / "init.pth")
    seed, lr, batch = 3, 0.05, 8
    args = VIT + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", str(batch), "--grad-accum-steps",
                  "2", "--epochs", "1", "--unscale-lr", "--lr", str(lr), "--warmup-epochs", "0", "--opt",
                  "momentum", "--momentum", "0", "--weight-decay", "0", "--no-repeated-aug", "--no-model-ema",
                  "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--smoothing", "0",
                  "--seed", str(seed), "--finetune", str(tmp_path / "init.pth")]
    out = tmp_path / "ddp"
    proc = run_main(args + ["--output_dir", str(out)], launcher=TORCHRUN, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = read_log(out / "log.txt")
    assert row["train_lr"] == lr

    ranks = [_rank_micro_batches(args, seed, r, 2, batch) for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]  # 32 images per rank: 4 micro-batches, 2 optimizer steps
    model = _tiny_vit(init)
    model.train()
    params = list(model.parameters())
    for step in range(2):
        group = [mb for r in ranks for mb in r[2 * step:2 * step + 2]]
        x, y = torch.cat([mb[0] for mb in group]), torch.cat([mb[1] for mb in group])
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    got = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(got["head.weight"], init["head.weight"])


def _tiny_vit(state: dict) -> nn.Module:
    import timm

    model = timm.create_model("deit_tiny_patch16_224", num_classes=CLASSES, img_size=32, patch_size=PATCH,
                              depth=DEPTH, embed_dim=DIM, num_heads=2)
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------- NaN on one rank
# main.py whose loss becomes NaN at the 2nd iteration on rank 1 only
NAN_ON_RANK1_ITER2 = """
import os, sys
sys.path.insert(0, {root!r})
if os.environ["RANK"] == "1":
    import losses
    _forward = losses.DistillationLoss.forward
    calls = [0]
    def forward(self, *args, **kwargs):
        calls[0] += 1
        loss = _forward(self, *args, **kwargs)
        return loss * float("nan") if calls[0] == 2 else loss
    losses.DistillationLoss.forward = forward
import main
sys.exit(main.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_with_exit_3_and_one_line(tmp_path):
    """The ranks are started by hand (env:// rendezvous, as torchrun would) so each one's exit code is seen;
    torchrun itself reports any failed worker as its own exit 1."""
    args = TINY + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "8", "--epochs", "1",
                   "--no-model-ema", "--output_dir", str(tmp_path / "nan")]
    script = NAN_ON_RANK1_ITER2.format(root=str(ROOT))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = child_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", script] + args, cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [code for code, _, _ in results] == [3, 3], [(c, e[-1500:]) for c, _, e in results]
    errors = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors  # rank 0 reports, once
    # 64 images over 2 ranks, batch 8: 4 iterations; rank 1's NaN at iteration 2 is seen by both ranks there
    assert "non-finite loss" in errors[0] and "epoch 0, iteration 2/4" in errors[0], errors[0]
    assert "no checkpoint was written yet" in errors[0]
    assert not any("Traceback" in err for _, _, err in results)
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()
