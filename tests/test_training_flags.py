"""Training flags through main.py: refused combinations (one line, exit 2, before any work), every flag's help
text, --amp auto, the ToE flags end to end (r1 = 1.0, sparse evaluation, stage starts, random seeds without
merging, LV-ViT's 'kept' dense loss), LV-ViT fine-tuning to another class count, and resuming under changed
settings. References are computed here: hand evaluations, the floor formula, gradients of the loss."""
from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY, child_env, killed_main, last_json, main_inprocess, read_log, run_main
from conftest import one_line_error as _one_line_error

SMALL = TINY + ["--data-set", "FAKE", "--fake-size", "32", "--batch-size", "16"]
# LV-ViT-T cut down like the token-labeling tests: 32 px, patch 4 (8x8 grid), depth 2, dim 64
LVVIT = ["--model", "lvvit_t", "--input-size", "32", "--model-kwargs", "patch_size=4", "depth=2", "embed_dim=64",
         "num_heads=2", "stem_chans=16", "--token-label", "--token-label-size", "8", "--data-set", "FAKE",
         "--device", "cpu", "--num_workers", "0", "--warmup-epochs", "0"]
TIMING_KEYS = {"epoch_time", "train_img_per_s"}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------- parser / help
def test_every_flag_has_a_help_text():
    import main

    parser = main.get_args_parser()
    empty = [a.option_strings for a in parser._actions
             if not isinstance(a, argparse._HelpAction)
             and (a.help is None or a.help == argparse.SUPPRESS or not str(a.help).strip())]
    assert not empty, f"flags without help text: {empty}"
    assert len(parser._actions) > 50  # the whole DeiT flag set is there, not an empty parser
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--toe-r1" in proc.stdout and proc.stderr == "", proc.stderr


# ------------------------------------------------------------------------------ refused flags: one line
# every --toe-* option with a non-default value, given without --toe-r1 (ToE off): silently ignoring it
# would run a different experiment than the command line says
TOE_WITHOUT_R1 = [
    ["--toe-ng", "2"], ["--toe-k", "3"], ["--toe-r0", "0.2"], ["--toe-layer", "2"],
    ["--toe-distance", "euclidean"], ["--toe-init", "random"], ["--toe-no-expand"], ["--toe-no-merge"],
    ["--toe-epochs", "5"], ["--toe-stage-epochs", "0", "1"], ["--toe-sparse-eval"], ["--toe-compat", "official"],
]


@pytest.mark.parametrize("flag", TOE_WITHOUT_R1, ids=lambda f: f[0])
def test_toe_flag_without_r1_is_one_line(flag, tmp_path):
    out = tmp_path / "never"
    line = _one_line_error(*main_inprocess(SMALL + flag + ["--output_dir", str(out)]), flag[0], "--toe-r1")
    assert "no effect" in line
    assert not out.exists()


def test_toe_dense_loss_without_r1_is_one_line(tmp_path):
    """--toe-dense-loss picks how ToE's removed positions are supervised; with --token-label but no --toe-r1
    there is no ToE, so 'kept' would silently do nothing (like the other --toe-* flags, it must be refused)."""
    out = tmp_path / "never"
    _one_line_error(*main_inprocess(LVVIT + ["--fake-size", "32", "--batch-size", "16", "--epochs", "1",
                                             "--toe-dense-loss", "kept", "--output_dir", str(out)]),
                    "--toe-dense-loss", "--toe-r1")
    assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    # r0 = r1 / 2 = 0.01 of 64 patches: floor(0.64) = 0 seed tokens
    (["--toe-r1", "0.02"], ["--toe-r1", "0.02", "0 seed"]),
    (["--toe-r1", "0.5", "--no-train-mode"], ["--no-train-mode", "--toe-r1"]),
    (["--resplit"], ["--resplit"]),
    (["--world_size", "3"], ["--world_size", "3"]),
])
def test_refused_before_any_work(extra, needles, tmp_path):
    out = tmp_path / "never"
    code, stdout, err = main_inprocess(SMALL + ["--epochs", "3"] + extra + ["--output_dir", str(out)])
    _one_line_error(code, stdout, err, *needles)
    assert stdout == "" and not out.exists()  # nothing built, nothing written


def test_toe_r1_just_large_enough_for_one_seed_is_accepted():
    """The boundary of the seed check: r0 = 1/64 keeps floor(1.0) = 1 seed of the 64 patches."""
    import config
    import main

    cfg = config.from_args(main.get_args_parser().parse_args(
        SMALL + ["--epochs", "3", "--toe-r1", "0.03125", "--toe-r0", str(1 / 64)]))
    assert math.floor(cfg.toe.schedule.r0 * 64 + 1e-9) == 1


@pytest.mark.parametrize("spelling", ["--local_rank", "--local-rank"])
def test_local_rank_is_accepted(spelling, monkeypatch):
    """torch.distributed.launch passes --local_rank (older) or --local-rank; a world of one accepts either, and
    under a launcher without LOCAL_RANK the flag is this process' local rank."""
    import config
    from runtime import distributed
    import main

    cfg = config.from_args(main.get_args_parser().parse_args(SMALL + ["--epochs", "1", spelling, "0",
                                                                      "--world_size", "1"]))
    assert cfg.run.local_rank == 0 and cfg.run.world_size == 1
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = main.get_args_parser().parse_args([f"{spelling}=1"])
    assert distributed.launcher_placement(args.local_rank) == (1, 2, 1)


def test_amp_auto_is_none_on_cpu():
    import config
    import main

    args = main.get_args_parser().parse_args(SMALL + ["--epochs", "1"])
    assert args.amp == "auto"  # the default
    cfg = config.from_args(args)
    assert cfg.run.amp == "none" and cfg.flags["amp"] == "none"


# ------------------------------------------------------------------------------------------ ToE flags
def _hand_evaluate(model: torch.nn.Module, size: int = 32, fake_size: int = 160) -> tuple:
    """(top-1 %, mean cross-entropy) of ``model`` on the FAKE validation split, one image at a time."""
    import datasets

    spec = datasets.DataSpec(name="FAKE", path=None, skip_bad_images=False, fake_size=fake_size, fake_classes=10,
                             fake_image_size=size)
    val, _ = datasets.build_dataset(False, spec, datasets.build_eval_transform(size, 0.875))
    model.eval()
    hits, losses = 0, []
    with torch.no_grad():
        for i in range(len(val)):
            x, y = val[i]
            logits = model(x[None])
            hits += int(logits.argmax(1).item() == y)
            losses.append(F.cross_entropy(logits, torch.tensor([y])).item())
    return 100.0 * hits / len(val), sum(losses) / len(losses)


def _tiny_vit(state: dict) -> torch.nn.Module:
    import timm

    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=3,
                              embed_dim=64, num_heads=2)
    model.load_state_dict(state)
    return model


@pytest.mark.slow
def test_toe_r1_one_is_bitwise_the_baseline(tmp_path):
    base_args = SMALL + ["--epochs", "3", "--model-ema-decay", "0.9"]  # r1 1.0 still checks epochs >= ng
    code, _, err = main_inprocess(base_args + ["--output_dir", str(tmp_path / "base")])
    assert code == 0, err
    code, _, err = main_inprocess(base_args + ["--toe-r1", "1.0", "--output_dir", str(tmp_path / "r1")])
    assert code == 0, err
    a, b = _load(tmp_path / "base" / "checkpoint.pth"), _load(tmp_path / "r1" / "checkpoint.pth")
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rows_a, rows_b = read_log(tmp_path / "base" / "log.txt"), read_log(tmp_path / "r1" / "log.txt")
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in rb.items() if k not in TIMING_KEYS}


@pytest.mark.slow
def test_sparse_eval_changes_main_and_ema_evaluation_and_eval_resume_reproduces_it(tmp_path, monkeypatch):
    """--toe-sparse-eval: the main and the EMA evaluation are those of the saved weights evaluated by hand with
    ToE applied in eval mode (toe.apply(sparse_eval=True)) at the epoch's stage, and differ from a dense
    evaluation; --eval --resume reproduces the logged numbers. log.txt holds only the EMA's top-1, which a
    tiny model rarely changes, so the EMA's loss is read from engine.evaluate's return value."""
    import engine
    import toe

    seen = []
    evaluate = engine.evaluate

    def spy(loader, model, *args, **kwargs):
        result = evaluate(loader, model, *args, **kwargs)
        index = toe.last_index(model) if toe.is_applied(model) else None
        seen.append((dict(result), None if index is None else int(index.shape[1])))
        return result

    monkeypatch.setattr(engine, "evaluate", spy)
    out = tmp_path / "sparse"
    # one epoch of a 2-epoch ToE schedule: the evaluation happens in stage 1 (keep rate 0.25: 16 of 64 patches)
    args = TINY + ["--data-set", "FAKE", "--fake-size", "160", "--batch-size", "32", "--epochs", "1",
                   "--toe-r1", "0.25", "--toe-ng", "2", "--toe-epochs", "2", "--toe-sparse-eval",
                   "--model-ema-decay", "0.9"]
    code, _, err = main_inprocess(args + ["--output_dir", str(out)])
    assert code == 0, err
    (row,) = read_log(out / "log.txt")
    (main_eval, main_tokens), (ema_eval, ema_tokens) = seen
    assert main_tokens == ema_tokens == 1 + 16  # both evaluations ran on the reduced token set
    ckpt = _load(out / "checkpoint.pth")
    results = {}
    for part in ("model", "model_ema"):
        for sparse in (False, True):
            model = _tiny_vit(ckpt[part])
            if sparse:
                toe.apply(model, toe.Schedule(r1=0.25, ng=2, k=2, epochs=2), sparse_eval=True)
                toe.set_epoch(model, 0)
            results[part, sparse] = _hand_evaluate(model)
    assert row["test_acc1"] == pytest.approx(results["model", True][0])
    assert row["test_loss"] == pytest.approx(results["model", True][1], rel=1e-5)
    assert row["ema_test_acc1"] == pytest.approx(results["model_ema", True][0])
    assert ema_eval["loss"] == pytest.approx(results["model_ema", True][1], rel=1e-5)
    # a dense evaluation gives other numbers, for both models (differences far above the tolerance)
    for part in ("model", "model_ema"):
        assert abs(results[part, True][1] - results[part, False][1]) > 3e-4, results

    seen.clear()
    code, stdout, err = main_inprocess(args + ["--eval", "--resume", str(out / "checkpoint.pth")])
    assert code == 0, err
    res = last_json(stdout)
    assert res["test_acc1"] == row["test_acc1"] and res["ema_test_acc1"] == row["ema_test_acc1"]
    assert res["test_loss"] == pytest.approx(row["test_loss"], rel=1e-6)
    assert seen[1][0]["loss"] == pytest.approx(ema_eval["loss"], rel=1e-6)


def _expected_tokens(r1: float, ng: int, starts: list, epochs: int, patches: int) -> list:
    """toe_tokens per epoch: stage = number of stage starts <= epoch; rate r_1 + (stage - 1)(1 - r1)/(ng - 1)
    (1.0 in the last stage, Eq. 1); tokens = floor(rate x patches)."""
    tokens = []
    for epoch in range(epochs):
        stage = sum(1 for s in starts if s <= epoch)
        rate = 1.0 if stage == ng else r1 + (stage - 1) * (1 - r1) / (ng - 1)
        tokens.append(math.floor(rate * patches + 1e-9))
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("form", [["0", "2", "3"], ["0,2,3"]], ids=["spaces", "commas"])
def test_stage_epochs_give_the_floor_formula_tokens(form, tmp_path):
    out = tmp_path / "stages"
    code, _, err = main_inprocess(SMALL + ["--epochs", "4", "--no-model-ema", "--toe-r1", "0.4", "--toe-ng", "3",
                                           "--toe-stage-epochs", *form, "--output_dir", str(out)])
    assert code == 0, err
    rows = read_log(out / "log.txt")
    assert [r["toe_tokens"] for r in rows] == _expected_tokens(0.4, 3, [0, 2, 3], 4, 64) == [25, 25, 44, 64]
    assert [r["toe_stage"] for r in rows] == [1, 1, 2, 3]
    # both spellings are recorded alike, so a resume does not see the other spelling as a changed schedule
    assert json.loads((out / "args.json").read_text())["toe_stage_epochs"] == [0, 2, 3]




def kill_then_resume_matches(args: list, tmp_path: Path) -> tuple:
    """Run ``args`` uninterrupted, and killed at epoch 1 iteration 3 then resumed; assert the two end bitwise
    equal (weights, EMA, optimizer, scaler, log rows). Returns both checkpoints."""
    ref_dir, out = tmp_path / "ref", tmp_path / "killed"
    proc = run_main(args + ["--output_dir", str(ref_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(killed_main(1, 3) + args + ["--output_dir", str(out)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _load(out / "checkpoint.pth")["epoch"] == 0
    again = run_main(args + ["--output_dir", str(out)])  # --resume auto
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    ref, got = _load(ref_dir / "checkpoint.pth"), _load(out / "checkpoint.pth")
    for part in ("model", "model_ema"):
        if ref.get(part) is None:
            assert got.get(part) is None
            continue
        for k in ref[part]:
            assert torch.equal(ref[part][k], got[part][k]), (part, k)
    for sa, sb in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert ref["scaler"] == got["scaler"]
    rows_ref, rows = read_log(ref_dir / "log.txt"), read_log(out / "log.txt")
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in rows_ref]
    for a, b in zip(rows_ref, rows):
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in b.items() if k not in TIMING_KEYS}
    return ref, got


@pytest.mark.slow
def test_resume_is_bitwise_with_random_seeds_and_no_merging(tmp_path):
    # epochs 0 and 1 keep 0.5 / 0.75 of a 3-epoch schedule: ToE (random seeds) runs in the killed epoch
    args = TINY + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "16", "--epochs", "2",
                         "--toe-r1", "0.5", "--toe-ng", "3", "--toe-epochs", "3", "--toe-init", "random",
                         "--toe-no-merge", "--model-ema-decay", "0.9", "--print-freq", "1"]
    ref, _ = kill_then_resume_matches(args, tmp_path)
    assert [r["toe_tokens"] for r in read_log(tmp_path / "ref" / "log.txt")] == [32, 48]


def _lvvit_model_and_batch(dense_loss: str):
    """The LV-ViT, its ToE patch and the token-label criterion exactly as main.py builds them from flags."""
    from training import builders
    import config
    import main
    from training import recipes

    args = main.get_args_parser().parse_args(LVVIT + ["--epochs", "2", "--toe-r1", "0.5", "--toe-ng", "2",
                                                      "--toe-dense-loss", dense_loss, "--no-mix-token"])
    cfg = config.from_args(args)
    recipe = recipes.recipe_for(cfg)
    torch.manual_seed(0)
    model, _ = builders.build_model(cfg.model, cfg.toe, 10, recipe.model_kwargs())
    return model, recipe.criterion(None, False)


@pytest.mark.parametrize("dense_loss", ["kept", "merged"])
def test_toe_dense_loss_kept_supervises_only_kept_positions(dense_loss):
    """The dense loss's gradient reaches the aux logits of exactly the positions whose own token ToE kept
    ('kept'), or every position ('merged'); the kept set is read from toe.last_index."""
    import toe
    import token_label

    model, criterion = _lvvit_model_and_batch(dense_loss)
    toe.set_epoch(model, 0)
    model.train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    labels = token_label.SyntheticTokenLabels([(None, c) for c in (0, 3, 5, 9)], 10, label_size=8, seed=2)
    maps = torch.stack([labels[i][1][1] for i in range(4)])
    out = model(images)
    out.aux.retain_grad()
    criterion(images, out, (torch.tensor([0, 3, 5, 9]), maps)).backward()

    index = toe.last_index(model)  # [B, 1 + n] positions in the unreduced sequence, prefix first
    assert index.shape == (4, 1 + 32)
    kept = torch.zeros(4, 64, dtype=torch.bool)
    for b in range(4):
        kept[b, index[b, 1:] - 1] = True
    assert int(kept.sum()) == 4 * 32
    reached = out.aux.grad.abs().sum(-1) > 0  # [B, 64] positions the loss supervises
    expected = kept if dense_loss == "kept" else torch.ones_like(kept)
    assert torch.equal(reached, expected)


@pytest.mark.slow
def test_lvvit_finetune_to_another_class_count_reinitialises_both_heads(tmp_path):
    import timm

    import models  # noqa: F401

    torch.manual_seed(0)
    src = timm.create_model("lvvit_t", num_classes=10, img_size=32, patch_size=4, depth=2, embed_dim=64,
                            num_heads=2, stem_chans=16)
    ckpt = tmp_path / "lvvit10.pth"
    torch.save({"model": src.state_dict()}, ckpt)
    out = tmp_path / "ft5"
    code, stdout, err = main_inprocess(LVVIT + ["--nb-classes", "5", "--fake-size", "32", "--batch-size", "16",
                                                "--epochs", "1", "--no-model-ema", "--finetune", str(ckpt),
                                                "--output_dir", str(out)])
    assert code == 0, err
    note = next(line for line in stdout.splitlines() if line.startswith("fine-tuning from"))
    assert "aux_head.weight" in note and "head.weight" in note
    got = _load(out / "checkpoint.pth")["model"]
    assert got["head.weight"].shape == (5, 64) and got["aux_head.weight"].shape == (5, 64)
    (row,) = read_log(out / "log.txt")
    assert row["train_loss"] == row["train_loss"]


# ------------------------------------------------------------------------------ resume with changes
@pytest.mark.slow
def test_resume_with_changed_settings(tmp_path):
    """A ToE change stops the resume with one line naming each changed flag (old -> new), and leaves the run
    folder alone; --resume-changed-ok continues; an --epochs change is a one-line notice and a log row.
    The first run also shows --amp auto resolved to none, in its first output line and in args.json."""
    out = tmp_path / "run"
    base = SMALL + ["--no-model-ema", "--toe-ng", "2", "--toe-epochs", "2", "--output_dir", str(out)]
    code, stdout, err = main_inprocess(base + ["--epochs", "1", "--toe-r1", "0.5"])
    assert code == 0, err
    first = stdout.splitlines()[0]
    assert first.startswith("run:") and "amp none" in first, first
    assert json.loads((out / "args.json").read_text())["amp"] == "none"
    log_before, args_before = (out / "log.txt").read_text(), (out / "args.json").read_text()

    code, stdout, err = main_inprocess(base + ["--epochs", "1", "--toe-r1", "0.6", "--toe-k", "3"])
    line = _one_line_error(code, stdout, err, "--toe-r1 0.5 -> 0.6", "--toe-k 2 -> 3", "--resume-changed-ok")
    assert "--epochs" not in line
    assert (out / "log.txt").read_text() == log_before and (out / "args.json").read_text() == args_before

    code, stdout, err = main_inprocess(base + ["--epochs", "2", "--toe-r1", "0.6", "--toe-k", "3",
                                               "--resume-changed-ok"])
    assert code == 0, err
    notices = [ln for ln in stdout.splitlines() if ln.startswith("notice:")]
    assert len(notices) == 1 and all(s in notices[0] for s in ("--toe-r1 0.5 -> 0.6", "--toe-k 2 -> 3",
                                                                "--epochs 1 -> 2")), notices
    code, stdout, err = main_inprocess(base + ["--epochs", "3", "--toe-r1", "0.6", "--toe-k", "3"])
    assert code == 0, err
    notices = [ln for ln in stdout.splitlines() if ln.startswith("notice:")]
    assert len(notices) == 1 and "--epochs 2 -> 3" in notices[0] and "toe" not in notices[0], notices
    rows = read_log(out / "log.txt")
    assert rows[1] == {"resumed_with_changes": {"toe_r1": [0.5, 0.6], "toe_k": [2, 3], "epochs": [1, 2]},
                       "epoch": 1}
    assert rows[3] == {"resumed_with_changes": {"epochs": [2, 3]}, "epoch": 2}
    assert [r["epoch"] for r in rows if "resumed_with_changes" not in r] == [0, 1, 2]
