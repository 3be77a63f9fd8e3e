"""--sched-on-updates: the lr of every optimizer update equals EfficientTrain's per-iteration cosine_scheduler."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import main_inprocess, read_log


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                              start_warmup_value=0.0):
    """A transcription of EfficientTrain's (BEiT's) utils.cosine_scheduler: one value per iteration."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = np.array([final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / len(iters)))
                       for i in iters])
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@pytest.mark.parametrize("epochs,niter,warmup,start", [(300, 312, 20, 0.0), (10, 7, 3, 1e-6), (5, 1, 1, 0.0),
                                                        (6, 4, 0, 0.0), (4, 3, 2, 0.0)])
def test_value_equals_the_official_schedule(epochs, niter, warmup, start):
    from training.lr_schedule import warmup_cosine_value

    expected = official_cosine_scheduler(4e-3, 1e-6, epochs, niter, warmup, start)
    got = [warmup_cosine_value(t, 4e-3, 1e-6, warmup * niter, epochs * niter, start) for t in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)
    assert warmup_cosine_value(epochs * niter + 5, 4e-3, 1e-6, warmup * niter, epochs * niter, start) == 1e-6


TINY = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--patch-size", "4", "--model-kwargs", "depth=2",
        "embed_dim=32", "num_heads=2", "--device", "cpu", "--num_workers", "0", "--data-set", "FAKE",
        "--fake-size", "40", "--batch-size", "8", "--grad-accum-steps", "2", "--no-repeated-aug", "--no-model-ema",
        "--epochs", "4", "--warmup-epochs", "2", "--warmup-lr", "0", "--min-lr", "1e-6", "--lr", "4e-3",
        "--unscale-lr", "--sched-on-updates", "--seed", "1"]


def _record_lrs(monkeypatch):
    import engine

    seen = []
    real_step = engine._optimizer_step

    def step(optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])  # the lr this update applies
        real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(engine, "_optimizer_step", step)
    return seen


def test_every_update_follows_the_official_curve(monkeypatch, tmp_path):
    """40 images, micro-batch 8, 2 accumulation steps: 5 micro-batches, 3 updates (2 + 2 + 1) per epoch."""
    seen = _record_lrs(monkeypatch)
    code, _, err = main_inprocess(TINY + ["--output_dir", str(tmp_path)])
    assert code == 0, err
    expected = official_cosine_scheduler(4e-3, 1e-6, 4, 3, 2, 0.0)
    assert len(seen) == 12
    np.testing.assert_allclose(seen, expected, rtol=1e-9, atol=0)
    assert seen[5] == pytest.approx(4e-3, rel=1e-12)  # the warm-up reaches the peak at its last update
    rows = read_log(tmp_path / "log.txt")
    assert rows[-1]["train_lr"] == pytest.approx(1e-6)  # after the last update: past the schedule's end


def test_batch_scaled_phases_stay_on_the_curve(monkeypatch, tmp_path):
    """--curriculum-batch-scale at half size: 2 updates of 16 images (the 5th micro-batch is dropped) in
    epochs 0-1, 3 updates at the final size. Each epoch starts at index epoch x 3, so every update takes the
    official value of its own index."""
    seen = _record_lrs(monkeypatch)
    code, _, err = main_inprocess(TINY + ["--curriculum-table", "0:16:1,2:32:3", "--curriculum-batch-scale",
                                          "--output_dir", str(tmp_path)])
    assert code == 0, err
    expected = official_cosine_scheduler(4e-3, 1e-6, 4, 3, 2, 0.0)
    indices = [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]
    np.testing.assert_allclose(seen, expected[indices], rtol=1e-9, atol=0)


def test_other_schedulers_step_per_update_through_timm(monkeypatch, tmp_path):
    """--sched step --sched-on-updates: timm's StepLRScheduler with t_in_epochs=False (updates as time)."""
    seen = _record_lrs(monkeypatch)
    code, _, err = main_inprocess(TINY + ["--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5",
                                          "--warmup-epochs", "0", "--output_dir", str(tmp_path)])
    assert code == 0, err
    # decay every 3 updates (one epoch's worth): 4e-3 x 0.5 ** floor(t / 3)
    np.testing.assert_allclose(seen, [4e-3 * 0.5 ** (t // 3) for t in range(12)], rtol=1e-9)


def test_sched_on_updates_refuses_the_plateau_scheduler():
    code, _, err = main_inprocess(TINY + ["--sched", "plateau"])
    assert code == 2 and err.startswith("error: --sched plateau") and len(err.strip().splitlines()) == 1, err
