"""Bad input -> one `error: ...` line on stderr, exit code 2, no traceback, before any training.
A non-finite loss -> one line naming the epoch, the iteration and the checkpoint to resume from."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, child_env, main_inprocess, run_main

BASE = TINY + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "16", "--epochs", "3", "--no-model-ema"]


def _assert_one_line_error(code: int, stdout: str, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err and "train epoch" not in stdout  # failed before any training
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("extra, needles", [
    (["--toe-r1", "1.5"], ["--toe-r1", "r1", "1.5"]),
    (["--toe-r1", "0"], ["--toe-r1", "r1"]),
    (["--toe-r1", "0.5", "--toe-ng", "0"], ["--toe-ng", "ng"]),
    (["--toe-r1", "0.5", "--toe-k", "0"], ["--toe-k", "k"]),
    (["--toe-r1", "0.4", "--toe-r0", "0.5"], ["--toe-r0", "r0"]),
    (["--toe-r1", "0.5", "--toe-layer", "9"], ["layer"]),
    (["--toe-r1", "0.5", "--toe-stage-epochs", "1", "2", "3"], ["stage_epochs"]),
    (["--model", "not_a_model_xyz"], ["unknown model", "not_a_model_xyz"]),
    (["--data-set", "FOLDER", "--data-path", "/nonexistent/imagenet"], ["/nonexistent/imagenet"]),
    (["--data-set", "IMNET"], ["--data-path"]),
    (["--batch-size", "15"], ["even"]),
    (["--amp", "fp8"], ["--amp"]),
])
def test_bad_flags(extra, needles):
    code, out, err = main_inprocess(BASE + extra)
    _assert_one_line_error(code, out, err, *needles)


def test_unknown_model_hint_is_ranked_by_edit_distance():
    # one character short of deit_tiny_patch16_224: that name first, not the deit3_* names sharing a prefix
    code, out, err = main_inprocess(BASE + ["--model", "deit_tiny_patch16_22"])
    _assert_one_line_error(code, out, err, "unknown model 'deit_tiny_patch16_22' (did you mean: deit_tiny_patch16_224,")


def test_empty_data_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = main_inprocess(BASE + ["--data-set", "FOLDER", "--data-path", str(empty)])
    _assert_one_line_error(code, out, err, "empty", str(empty))


def test_unreadable_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(2048))
    code, out, err = main_inprocess(BASE + ["--resume", str(garbage)])
    _assert_one_line_error(code, out, err, str(garbage))

    code, out, err = main_inprocess(BASE + ["--finetune", str(tmp_path / "missing.pth")])
    _assert_one_line_error(code, out, err, "missing.pth")

    # a valid checkpoint cut in half (a crash during a non-atomic copy)
    full = tmp_path / "full.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, full)
    half = tmp_path / "half.pth"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    code, out, err = main_inprocess(BASE + ["--finetune", str(half)])
    _assert_one_line_error(code, out, err, "half.pth")


class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Payload(marker)}, evil)
    code, out, err = main_inprocess(BASE + ["--resume", str(evil)])
    _assert_one_line_error(code, out, err, "evil.pth")
    assert not marker.exists()


def test_incompatible_finetune_and_resume_checkpoints(tmp_path):
    import timm

    other = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=3,
                              embed_dim=32, num_heads=2)
    path = tmp_path / "dim32.pth"
    torch.save({"model": other.state_dict()}, path)
    code, out, err = main_inprocess(BASE + ["--finetune", str(path)])
    _assert_one_line_error(code, out, err, "incompatible --finetune", "pos_embed")

    deeper = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=4,
                               embed_dim=64, num_heads=2)
    path2 = tmp_path / "depth4.pth"
    torch.save({"model": deeper.state_dict()}, path2)
    code, out, err = main_inprocess(BASE + ["--finetune", str(path2)])
    _assert_one_line_error(code, out, err, "incompatible --finetune", "unexpected")

    code, out, err = main_inprocess(BASE + ["--resume", str(path2)])
    _assert_one_line_error(code, out, err, "depth4.pth")


def test_non_finite_loss_names_epoch_iteration_and_checkpoint(tmp_path):
    out_dir = tmp_path / "nan"
    code, out, err = main_inprocess(BASE + ["--epochs", "1", "--output_dir", str(out_dir)])
    assert code == 0, err
    ckpt_path = out_dir / "checkpoint.pth"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"]["head.weight"].fill_(float("nan"))  # the next forward gives NaN logits
    torch.save(ckpt, ckpt_path)

    code, out, err = main_inprocess(BASE + ["--epochs", "2", "--output_dir", str(out_dir)])
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "non-finite loss" in lines[0]
    assert "epoch 1, iteration 1/4" in lines[0]
    assert str(ckpt_path) in lines[0] and "last completed epoch 0" in lines[0]


def test_real_process_prints_one_line_and_exits_2():
    proc = run_main(BASE + ["--toe-r1", "0.5", "--toe-ng", "0"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --toe-ng: ng must be an integer >= 1, got 0"]
    assert proc.stdout == ""


@pytest.mark.parametrize("flags", [
    ["--toe-r1", "1.5"], ["--toe-r1", "0.5", "--toe-r0", "0.6"], ["--toe-k", "0", "--toe-r1", "0.5"],
    ["--batch-size", "0"], ["--data-set", "IMNET", "--data-path", "/nonexistent/imagenet"],
    ["--model-kwargs", "depth"], ["--no-such-flag"],
])
def test_bad_flags_fail_before_torch_is_imported(flags):
    # "fail in the first second": flag, ToE and data-path checks run before the multi-second torch import
    code = ("import sys, main\n"
            f"rc = main.main({flags!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported before the error'\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
