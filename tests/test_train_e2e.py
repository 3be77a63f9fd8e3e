"""End-to-end runs of main.py: ToE schedule in log.txt, checkpoints, --eval, kill -9 + resume (bitwise),
torchrun with 2 gloo ranks and exact --dist-eval, CIFAR fine-tuning, distillation/bf16/EMA/mixup paths."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import torch

from conftest import (E2E, ROOT, TINY, child_env, killed_main, last_json, main_inprocess, read_log, run_main,
                      write_cifar)

LOG_KEYS = {"train_loss", "train_lr", "toe_stage", "toe_keep_rate", "toe_tokens", "epoch_time", "train_img_per_s",
            "test_acc1", "test_acc5", "test_loss", "ema_test_acc1", "n_parameters", "gflops_per_iter", "epoch",
            "skipped_images"}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_e2e_toe_schedule_checkpoints_and_eval(e2e_run):
    out: Path = e2e_run["out"]
    rows = read_log(out / "log.txt")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert LOG_KEYS <= r.keys(), LOG_KEYS - r.keys()
    # ng=3, r1=0.5: one stage per epoch, keep rate 0.5 -> 0.75 -> 1.0 (the last stage trains on every token)
    assert [r["toe_stage"] for r in rows] == [1, 2, 3]
    assert [r["toe_keep_rate"] for r in rows] == [0.5, 0.75, 1.0]
    # tokens measured from the last training forward: floor(r * 64) of the 8x8 patches
    assert [r["toe_tokens"] for r in rows] == [32, 48, 64]
    g = [r["gflops_per_iter"] for r in rows]
    assert g[0] < g[1] < g[2], g
    assert rows[0]["n_parameters"] == 158090
    # training learns the synthetic classes (10 classes: chance is 10%)
    assert rows[-1]["test_acc1"] > 70.0, rows[-1]  # measured 84.4 (seed 7); chance is 10
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    ckpt = _load(out / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "scaler", "model_ema", "epoch", "rng", "args"} <= ckpt.keys()
    assert ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict) and ckpt["args"]["toe_r1"] == 0.5
    assert {"torch", "numpy", "python"} <= ckpt["rng"].keys()
    assert json.loads((out / "args.json").read_text()) == ckpt["args"]
    best = _load(out / "best_checkpoint.pth")
    best_epoch = max(rows, key=lambda r: r["test_acc1"])["epoch"]
    assert best["epoch"] == min(r["epoch"] for r in rows if r["test_acc1"] == rows[best_epoch]["test_acc1"])
    assert list((out / "tb").glob("events.out.tfevents.*")), "no tensorboard events"
    assert not list(out.glob(".*.tmp")), "temporary checkpoint files left behind"

    # --eval of the final checkpoint reproduces the logged accuracy of the last epoch
    code, stdout, err = main_inprocess(E2E + ["--eval", "--resume", str(out / "checkpoint.pth")])
    assert code == 0, err
    res = last_json(stdout)
    assert res["test_acc1"] == rows[-1]["test_acc1"]
    assert res["test_acc5"] == rows[-1]["test_acc5"]
    assert res["ema_test_acc1"] == rows[-1]["ema_test_acc1"]
    assert abs(res["test_loss"] - rows[-1]["test_loss"]) < 1e-5


def test_kill9_mid_epoch_then_resume_is_bitwise_identical(e2e_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run(killed_main(1, 3) + E2E + ["--output_dir", str(out), "--print-freq", "1"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "train epoch 1 |  3/10" in proc.stdout and "train epoch 1 |  4/10" not in proc.stdout
    # killed mid-epoch 1: epoch 0 is the last completed one, and the log holds it alone
    assert _load(out / "checkpoint.pth")["epoch"] == 0
    assert [r["epoch"] for r in read_log(out / "log.txt")] == [0]

    again = run_main(E2E + ["--output_dir", str(out)])  # same command: --resume auto
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout

    ref, got = _load(e2e_run["out"] / "checkpoint.pth"), _load(out / "checkpoint.pth")
    _assert_state_equal(ref["model"], got["model"], "model")
    _assert_state_equal(ref["model_ema"], got["model_ema"], "model_ema")
    for sa, sb in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        _assert_state_equal(sa, sb, "optimizer state")
    rows_ref, rows = read_log(e2e_run["out"] / "log.txt"), read_log(out / "log.txt")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for a, b in zip(rows_ref, rows):
        for k in ("train_loss", "test_acc1", "test_loss", "toe_tokens", "ema_test_acc1"):
            assert a[k] == b[k], (k, a, b)


def test_torchrun_two_ranks_rank0_writes_and_dist_eval_is_exact(tmp_path):
    out = tmp_path / "ddp"
    # 225 training images -> 45 validation images: 23 + 22 over two ranks, which a padded sampler would
    # round up to 46 with a duplicate
    args = TINY + ["--data-set", "FAKE", "--fake-size", "225", "--batch-size", "16", "--epochs", "2",
                   "--toe-r1", "0.5", "--toe-ng", "2", "--no-model-ema", "--dist-eval", "--output_dir", str(out)]
    # --standalone: a local rendezvous on a free port (no clash with other test processes)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = run_main(args, launcher=launcher, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "rank 0/2 joined (gloo, env://)" in text
    assert "rank 1/2 joined (gloo, env://)" in text
    # only rank 0 writes: one log line per epoch, one tensorboard file, no other files
    rows = read_log(out / "log.txt")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [r["toe_keep_rate"] for r in rows] == [0.5, 1.0]
    assert rows[-1]["test_images"] == 45
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "best_checkpoint.pth", "checkpoint.pth", "log.txt", "tb"]
    assert len(list((out / "tb").iterdir())) == 1

    single = [a for a in args if a != "--dist-eval"]
    code, stdout, err = main_inprocess(single + ["--eval", "--resume", str(out / "checkpoint.pth")])
    assert code == 0, err
    res = last_json(stdout)
    assert res["n"] == 45
    assert res["test_acc1"] == rows[-1]["test_acc1"] and res["test_acc5"] == rows[-1]["test_acc5"]
    assert abs(res["test_loss"] - rows[-1]["test_loss"]) < 1e-5


def _teacher(path: Path, num_classes: int) -> Path:
    import timm

    torch.manual_seed(0)
    t = timm.create_model("resnet10t", num_classes=num_classes)
    torch.save({"model": t.state_dict()}, path)
    return path


def test_cifar10_distilled_student_hard_distillation_bf16_accum(tmp_path):
    # 5 files x 12 images = 60 -> 3 micro-batches of 16 (bf16 is slow on CPUs without bf16 units)
    root = write_cifar(tmp_path / "c10", "CIFAR10", n_train=60, n_test=40)
    teacher = _teacher(tmp_path / "teacher10.pth", 10)
    out = tmp_path / "run10"
    args = TINY + ["--model", "deit_tiny_distilled_patch16_224", "--data-set", "CIFAR10", "--data-path", str(root),
                   "--batch-size", "16", "--epochs", "1", "--toe-r1", "0.5", "--toe-ng", "2", "--toe-epochs", "2",
                   "--distillation-type", "hard", "--teacher-model", "resnet10t", "--teacher-path", str(teacher),
                   "--amp", "bf16", "--grad-accum-steps", "2", "--grad-checkpointing", "--output_dir", str(out)]
    code, stdout, err = main_inprocess(args)
    assert code == 0, err
    (row,) = read_log(out / "log.txt")
    assert row["test_images"] == 40
    assert row["toe_tokens"] == 32  # ToE ran on the 2-prefix-token distilled model
    assert "ema_test_acc1" in row  # EMA on by default (DeiT)
    # 3 micro-batches with --grad-accum-steps 2 -> 2 optimizer steps (the last group is shorter)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {2}


def test_cifar100_finetune_new_head_and_pos_embed_soft_distillation(e2e_run, tmp_path):
    root = write_cifar(tmp_path / "c100", "CIFAR100", n_train=160, n_test=40)
    teacher = _teacher(tmp_path / "teacher100.pth", 100)
    src = e2e_run["out"] / "checkpoint.pth"  # 10 classes, 32 px -> 8x8 grid
    out = tmp_path / "ft"
    args = TINY + ["--input-size", "48", "--data-set", "CIFAR100", "--data-path", str(root), "--batch-size", "16",
                   "--epochs", "1", "--finetune", str(src), "--attn-only", "--bce-loss",
                   "--distillation-type", "soft", "--teacher-model", "resnet10t", "--teacher-path", str(teacher),
                   "--no-repeated-aug", "--output_dir", str(out)]
    code, stdout, err = main_inprocess(args)
    assert code == 0, err
    assert "pos_embed resampled" in stdout and "head.weight" in stdout
    got = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    ref = torch.load(src, weights_only=True)["model"]
    assert got["head.weight"].shape == (100, 64)
    assert got["pos_embed"].shape == (1, 1 + 12 * 12, 64)
    # --attn-only froze the MLPs: they are still exactly the fine-tuned checkpoint's weights
    assert torch.equal(got["blocks.1.mlp.fc1.weight"], ref["blocks.1.mlp.fc1.weight"])
    assert not torch.equal(got["blocks.1.attn.qkv.weight"], ref["blocks.1.attn.qkv.weight"])
    (row,) = read_log(out / "log.txt")
    assert row["n_parameters"] < sum(v.numel() for k, v in got.items())


def test_throughput_mode(e2e_run, monkeypatch):
    """images/s = batch x timed iterations / elapsed, at the ToE stage of the run's next epoch: with a clock
    that advances 0.5 s per reading, each timed block (10 iterations of batch 8) reads exactly 160 img/s."""
    import engine

    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(ticks) * 0.5)
    base = TINY + ["--data-set", "FAKE", "--batch-size", "8", "--throughput", "--toe-r1", "0.5", "--toe-ng", "3",
                   "--epochs", "3"]
    code, stdout, err = main_inprocess(base)
    assert code == 0, err
    res = last_json(stdout)
    assert (res["eval_img_per_s"], res["train_img_per_s"]) == (160.0, 160.0)
    assert (res["epoch"], res["toe_keep_rate"]) == (0, 0.5)
    # resumed from the reference run's last checkpoint (epoch 2 done): its stage is the last one, all tokens
    code, stdout, err = main_inprocess(base + ["--resume", str(e2e_run["out"] / "checkpoint.pth")])
    assert code == 0, err
    res = last_json(stdout)
    assert (res["epoch"], res["toe_keep_rate"]) == (2, 1.0)


def test_lvvit_token_labeling_with_toe(tmp_path):
    out = tmp_path / "lvvit"
    args = ["--model", "lvvit_t", "--input-size", "32", "--model-kwargs", "patch_size=4", "depth=2", "embed_dim=64",
            "num_heads=2", "stem_chans=16", "--token-label", "--token-label-size", "8", "--data-set", "FAKE",
            "--fake-size", "64", "--batch-size", "16", "--epochs", "2", "--toe-r1", "0.5", "--toe-ng", "2",
            "--device", "cpu", "--num_workers", "0", "--warmup-epochs", "0", "--output_dir", str(out)]
    code, stdout, err = main_inprocess(args)
    assert code == 0, err
    rows = read_log(out / "log.txt")
    assert [r["toe_tokens"] for r in rows] == [32, 64]
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in rows)
    assert all(math.isfinite(r["ema_test_acc1"]) for r in rows)
    # a wrong label-map size is a flag error, caught before training
    code, stdout, err = main_inprocess(args[:args.index("--token-label-size") + 1] + ["14"]
                                       + args[args.index("--token-label-size") + 2:])
    assert code == 2 and err.startswith("error: --token-label-size 14 does not match the patch grid 8x8"), err


def _image_folder(root: Path, corrupt: bool) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "class0" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = _image_folder(tmp_path / "folder", corrupt=True)
    args = TINY + ["--data-set", "FOLDER", "--data-path", str(root), "--batch-size", "8", "--epochs", "1",
                   "--no-model-ema", "--no-repeated-aug"]
    code, stdout, err = main_inprocess(args + ["--output_dir", str(tmp_path / "strict")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(root / "train" / "class0" / "0.png") in err

    out = tmp_path / "skip"
    code, stdout, err = main_inprocess(args + ["--skip-bad-images", "--output_dir", str(out)])
    assert code == 0, err
    (row,) = read_log(out / "log.txt")
    assert row["skipped_images"] == 1 and row["test_images"] == 8


def test_real_images_learn_with_toe(tmp_path, real_image_set):
    data = real_image_set
    out = tmp_path / "inet"
    args = [a if a != "1e-3" else "2e-3" for a in TINY] + [
        "--data-set", "FOLDER", "--data-path", str(data), "--batch-size", "50", "--epochs", "2",
        "--toe-r1", "0.5", "--toe-ng", "2", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
        "--no-repeated-aug", "--no-model-ema", "--output_dir", str(out)]
    proc = run_main(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_log(out / "log.txt")
    assert [r["toe_keep_rate"] for r in rows] == [0.5, 1.0]
    assert [r["toe_tokens"] for r in rows] == [32, 64]
    assert rows[0]["test_images"] == 300
    # chance is 10% (sd 1.7 points over 300 images); measured 21.3 and 20.7 after epochs 1 and 2
    assert max(r["test_acc1"] for r in rows) > 17.0, [r["test_acc1"] for r in rows]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
