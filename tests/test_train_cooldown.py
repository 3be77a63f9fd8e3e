"""--train-cooldown: LV-ViT's timm loop trains the epochs timm's scheduler reports (cosine: --epochs +
--cooldown-epochs, the extra ones at --min-lr); DeiT's loop, the default, stops at --epochs. References: the
hand-written cosine values and timm train.py's count (epochs + cooldown for cosine, epochs for step)."""
from __future__ import annotations

import math

import pytest

from conftest import TINY, main_inprocess, read_log

SMALL = TINY + ["--data-set", "FAKE", "--fake-size", "32", "--batch-size", "16", "--no-model-ema"]


def _parse(extra):
    import config
    import main

    return config.from_args(main.get_args_parser().parse_args(SMALL + extra))


@pytest.mark.parametrize("sched,extra,loop", [("cosine", [], 310), ("cosine", ["--no-train-cooldown"], 300),
                                              ("step", [], 300)])
def test_loop_length_is_timms_count(sched, extra, loop):
    from training import builders

    cfg = _parse(["--epochs", "300", "--cooldown-epochs", "10", "--sched", sched, "--train-cooldown"] + extra)
    assert cfg.run.epochs == loop and cfg.run.schedule_epochs == 300
    assert builders.scheduled_epochs(cfg.optim, 300) == (310 if sched == "cosine" else 300)


def test_default_trains_exactly_epochs():
    cfg = _parse(["--epochs", "300", "--cooldown-epochs", "10"])
    assert cfg.run.epochs == 300 and cfg.flags["train_cooldown"] is False


def test_cooldown_epochs_train_at_min_lr(tmp_path):
    base, min_lr = 1e-3, 1e-5
    code, out, err = main_inprocess(SMALL + ["--epochs", "2", "--cooldown-epochs", "2", "--train-cooldown",
                                             "--min-lr", str(min_lr), "--output_dir", str(tmp_path)])
    assert code == 0, err
    rows = [r for r in read_log(tmp_path / "log.txt") if "epoch" in r]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    # cosine over the 2 scheduled epochs (epoch e at t = e), then min_lr for the 2 cooldown epochs
    want = [base, min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi / 2)), min_lr, min_lr]
    for r, lr in zip(rows, want):
        assert r["train_lr"] == pytest.approx(lr, rel=1e-9), (r["epoch"], r["train_lr"])
