"""Unit tests of engine/losses/utils against independent references written here."""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
import losses
from runtime import checkpoint
from training import finetune
from runtime import runlog
import utils
from runtime.errors import CheckpointError
from runtime.files import atomic_write

from conftest import ROOT


def _loader(n: int, batch: int, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def _mlp(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.GELU(), nn.Linear(32, classes))


def _ce(samples, outputs, targets):
    return F.cross_entropy(outputs, targets)


def test_evaluate_matches_reference():
    model = _mlp(7)
    loader = _loader(53, 10, classes=7)  # last batch of 3
    res = engine.evaluate(loader, model, torch.device("cpu"))
    xs = torch.cat([b[0] for b in loader])
    ys = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        logits = model(xs)
    ranks = (logits > logits.gather(1, ys[:, None])).sum(1)  # how many classes score above the target
    assert res["n"] == 53
    assert res["acc1"] == pytest.approx(100.0 * (ranks == 0).float().mean().item())
    assert res["acc5"] == pytest.approx(100.0 * (ranks < 5).float().mean().item())
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-6)


def test_grad_accumulation_equals_large_batch():
    """4 micro-batches of 8 with accumulation 4 == one batch of 32 (one SGD step, same gradient)."""
    ref, acc = _mlp(), _mlp()
    dev = torch.device("cpu")
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.5)
    s_ref = engine.train_one_epoch(ref, _ce, _loader(32, 32), opt_ref, dev, 0, print_freq=100)
    s_acc = engine.train_one_epoch(acc, _ce, _loader(32, 8), opt_acc, dev, 0, grad_accum_steps=4, print_freq=100)
    assert s_ref["optimizer_steps"] == 1 and s_acc["optimizer_steps"] == 1
    for a, b in zip(ref.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_short_last_group_is_mean_of_its_batches():
    """5 micro-batches with accumulation 2: steps after 2, 4 and 5; the last step uses batch 5 alone."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = _loader(40, 8)
    stats = engine.train_one_epoch(model, _ce, loader, opt, torch.device("cpu"), 0, grad_accum_steps=2,
                                   print_freq=100)
    assert stats["optimizer_steps"] == 3 and stats["images"] == 40

    ref = _mlp()
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    batches = list(loader)
    for group in (batches[0:2], batches[2:4], batches[4:5]):
        ropt.zero_grad()
        x = torch.cat([b[0] for b in group])
        y = torch.cat([b[1] for b in group])
        F.cross_entropy(ref(x), y).backward()
        ropt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fp16_scaler_and_bf16_paths_step():
    for amp, scaler in ((torch.bfloat16, None), (torch.float16, torch.amp.GradScaler("cpu"))):
        model = _mlp()
        before = copy.deepcopy(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        stats = engine.train_one_epoch(model, _ce, _loader(16, 8), opt, torch.device("cpu"), 0, amp_dtype=amp,
                                       scaler=scaler, max_norm=1.0, print_freq=100)
        assert stats["optimizer_steps"] == 2 and np.isfinite(stats["loss"])
        assert not torch.equal(before["1.weight"], model.state_dict()["1.weight"])


def test_ema_updates_once_per_optimizer_step():
    from timm.utils import ModelEmaV3

    model = _mlp()
    ema = ModelEmaV3(model, decay=0.5)
    w0 = model[1].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine.train_one_epoch(model, _ce, _loader(16, 16), opt, torch.device("cpu"), 0, model_ema=ema, print_freq=100)
    # one step: ema = 0.5 * w0 + 0.5 * w1
    torch.testing.assert_close(ema.module[1].weight, 0.5 * w0 + 0.5 * model[1].weight.detach())


def test_non_finite_loss_raises_with_epoch_and_iteration():
    model = _mlp()
    calls = {"n": 0}

    def crit(samples, outputs, targets):
        calls["n"] += 1
        loss = F.cross_entropy(outputs, targets)
        return loss * float("inf") if calls["n"] == 3 else loss

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(engine.NonFiniteLossError) as ei:
        engine.train_one_epoch(model, crit, _loader(40, 8), opt, torch.device("cpu"), 4, print_freq=100)
    assert (ei.value.epoch, ei.value.iteration, ei.value.total) == (4, 3, 5)


def test_distillation_losses_match_formulas():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 5, (6,))
    cls, dist = torch.randn(6, 5), torch.randn(6, 5)
    t = teacher(x).detach()
    base = nn.CrossEntropyLoss()
    alpha, tau = 0.3, 2.0

    soft = losses.DistillationLoss(base, teacher, "soft", alpha, tau)(x, (cls, dist), y)
    p_t = F.softmax(t / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(dist / tau, 1))).sum() * tau * tau / dist.numel()
    torch.testing.assert_close(soft, (1 - alpha) * F.cross_entropy(cls, y) + alpha * kl)

    hard = losses.DistillationLoss(base, teacher, "hard", alpha, tau)(x, (cls, dist), y)
    ref = (1 - alpha) * F.cross_entropy(cls, y) + alpha * F.cross_entropy(dist, t.argmax(1))
    torch.testing.assert_close(hard, ref)

    none = losses.DistillationLoss(base, None, "none", alpha, tau)(x, cls, y)
    torch.testing.assert_close(none, F.cross_entropy(cls, y))
    assert not list(losses.DistillationLoss(base, teacher, "hard", alpha, tau).parameters())  # teacher not owned


def test_checkpoint_roundtrip_with_rng_under_weights_only(tmp_path):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "ck.pth"
    flags = utils.plain_dict({"lr": 1e-3, "out": tmp_path, "betas": (0.9, 0.99)})
    checkpoint.save(str(path), checkpoint.training_state(model=model, optimizer=opt, lr_scheduler=None, scaler=None,
                                                         model_ema=None, epoch=4, config=flags, max_accuracy=12.5))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(4), torch.rand(9)  # advance everything

    ck = checkpoint.read(str(path))  # weights_only=True inside
    assert ck["epoch"] == 4 and ck["max_accuracy"] == 12.5
    assert ck["args"] == {"lr": 1e-3, "out": str(tmp_path), "betas": [0.9, 0.99]}
    checkpoint.restore_rng_state(ck["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    fresh = _mlp()
    fresh.load_state_dict(ck["model"])
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save(str(path), {"v": torch.tensor([1.0])})

    def boom(f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. the job is interrupted mid-save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), boom)
    assert torch.load(path, weights_only=True)["v"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temp file left


def test_truncate_log_keeps_earlier_epochs_once(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps({"epoch": e, "x": e}) + "\n" for e in (0, 1, 2, 3)) + '{"epoch": 4, "x"')
    runlog.truncate(str(log), 2)
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1]


def test_finetune_adaptation_resamples_pos_embed_and_drops_head():
    import timm

    kw = dict(patch_size=4, depth=2, embed_dim=32, num_heads=2)
    src = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, **kw)
    dst = timm.create_model("deit_tiny_patch16_224", num_classes=100, img_size=48, **kw)
    fit = finetune.adapt_state_dict(src.state_dict(), dst)
    assert sorted(fit["dropped"]) == ["head.bias", "head.weight"] and fit["resampled"]
    pe = fit["state"]["pos_embed"]
    assert pe.shape == (1, 1 + 144, 32)
    old = src.pos_embed.detach()
    torch.testing.assert_close(pe[:, :1], old[:, :1])  # class token's embedding unchanged
    grid = old[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pe[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 144, 32), rtol=1e-4, atol=1e-5)
    missing, unexpected = dst.load_state_dict(fit["state"], strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected

    with pytest.raises(CheckpointError, match="incompatible"):
        other = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=3,
                                  embed_dim=32, num_heads=2)
        finetune.adapt_state_dict(other.state_dict(), dst)


def test_epoch_seed_depends_on_seed_rank_epoch_only():
    seeds = {utils.epoch_seed(s, r, e) for s in (0, 1) for r in (0, 1) for e in range(4)}
    assert len(seeds) == 16
    # a pure function of its arguments: the same value after unrelated random draws, in another process
    # (numpy's SeedSequence of [seed, rank, epoch] is the independent reference)
    before = utils.epoch_seed(3, 1, 2)
    random.random(), np.random.rand(3), torch.rand(2)
    assert utils.epoch_seed(3, 1, 2) == before
    assert before == int(np.random.SeedSequence([3, 1, 2]).generate_state(1)[0])
    code = "import sys; sys.path.insert(0, %r); import utils; print(utils.epoch_seed(3, 1, 2))" % str(ROOT)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(other.stdout.strip()) == before, other.stderr


def test_submitit_requeue_resumes_from_the_job_checkpoint(tmp_path, monkeypatch):
    import run_with_submitit as rws

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    args, main_argv = rws.parse_args(["--nodes", "2", "--ngpus", "4", "--timeout", "60", "--partition", "p",
                                      "--job_dir", str(tmp_path / "%j"), "--", "--model", "deit_tiny_patch16_224",
                                      "--epochs", "5"])
    assert (args.nodes, args.ngpus, args.timeout, args.partition) == (2, 4, 60, "p")
    trainer = rws.Trainer(main_argv, args.job_dir)
    job_out = tmp_path / "4242"
    job_out.mkdir()
    (job_out / "checkpoint.pth").write_bytes(b"x")
    resubmission = trainer.checkpoint()
    argv = resubmission.function.main_argv
    assert argv[argv.index("--output_dir") + 1] == str(job_out)
    assert argv[argv.index("--resume") + 1] == str(job_out / "checkpoint.pth")
    assert argv[:4] == ["--model", "deit_tiny_patch16_224", "--epochs", "5"]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fused_and_foreach_adamw_step_like_the_loop(impl):
    """--opt-impl: torch's fused / foreach AdamW kernels give the per-parameter loop's step (CPU supports all
    three in torch >= 2.4); 'auto' picks fused on CUDA only."""
    from training import builders

    assert builders.optimizer_impl_kwargs("adamw", "auto", "cuda") == {"fused": True}
    assert builders.optimizer_impl_kwargs("adamw", "auto", "cpu") == {}
    assert builders.optimizer_impl_kwargs("lamb", "auto", "cuda") == {}
    results = []
    for kind in ("loop", impl):
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05,
                                **builders.optimizer_impl_kwargs("adamw", kind, "cpu"))
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(4, 3, 8, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for loop_param, fast_param in zip(*results):
        torch.testing.assert_close(fast_param, loop_param, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(results[0], [p.detach() for p in _mlp().parameters()]))
