"""Every check runs before the output folder is claimed: a command refused for a file a flag names, a recipe the
loader cannot run, data it cannot train on or a checkpoint that does not fit prints one `error:` line and
nothing else, exits 2, and leaves the folder byte for byte as it was (nothing moved by --overwrite, no lock,
no new folder). A rerun of a finished run says so and writes nothing."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, main_inprocess, one_line_error

BASE = TINY + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "16", "--no-model-ema"]
ONE_EPOCH = BASE + ["--epochs", "1"]


def _tree(folder: Path) -> dict:
    """Every entry under ``folder``, hidden ones included: a file's sha256, '<dir>' for a folder."""
    return {str(p.relative_to(folder)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code, _, err = main_inprocess(ONE_EPOCH + ["--output_dir", str(out)])
    assert code == 0, err
    return out


@pytest.fixture
def files(tmp_path) -> dict:
    """Files for flags to name: a garbage file and the weights of another architecture."""
    import timm

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1024))
    other = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=3,
                              embed_dim=32, num_heads=2)
    wrong = tmp_path / "dim32.pth"
    torch.save({"model": other.state_dict()}, wrong)
    (tmp_path / "empty_data" / "train").mkdir(parents=True)
    (tmp_path / "empty_data" / "val").mkdir()
    return {"MISSING": str(tmp_path / "missing.pth"), "GARBAGE": str(garbage), "WRONG": str(wrong),
            "EMPTY": str(tmp_path / "empty_data")}


# flags refused only once the files, the data or the model are read: (extra flags, words of the error line)
LATE_CHECKS = [
    (["--finetune", "MISSING"], ["checkpoint not found", "missing.pth"]),
    (["--finetune", "GARBAGE"], ["cannot read checkpoint", "garbage.pth"]),
    (["--finetune", "WRONG"], ["incompatible --finetune", "pos_embed"]),
    (["--distillation-type", "soft", "--teacher-path", "MISSING"], ["checkpoint not found", "missing.pth"]),
    (["--distillation-type", "soft", "--teacher-path", "WRONG", "--teacher-model", "deit_tiny_patch16_224",
      "--teacher-model-kwargs", "patch_size=4", "depth=3", "embed_dim=64", "num_heads=2"], ["dim32.pth"]),
    (["--resume", "MISSING"], ["checkpoint not found", "missing.pth"]),
    (["--resume", "GARBAGE"], ["cannot read checkpoint"]),
    (["--aa", "rand-x9"], ["bad augmentation setting", "rand-x9"]),
    (["--curriculum", "efficienttrain", "--epochs", "5", "--aa", "augmix-m5"], ["rand-", "augmix-m5"]),
    (["--data-set", "FOLDER", "--data-path", "EMPTY"], ["empty image folder"]),
    (["--fake-size", "10"], ["smaller than one batch"]),
]


def _filled(extra: list, files: dict) -> list:
    return [files.get(word, word) for word in extra]


@pytest.mark.parametrize("extra, needles", LATE_CHECKS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_late_check_with_overwrite_moves_nothing(extra, needles, finished, files, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _tree(run)
    code, out, err = main_inprocess(ONE_EPOCH + _filled(extra, files) + ["--overwrite", "--output_dir", str(run)])
    one_line_error(code, out, err, *needles)
    assert out == ""  # no run: line, no flags, no GFLOPs or model line first
    assert _tree(run) == before  # nothing moved to old-<time>/, no lock left, no byte changed


@pytest.mark.parametrize("extra, needles", LATE_CHECKS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_late_check_creates_no_folder(extra, needles, files, tmp_path):
    new = tmp_path / "new" / "run"
    code, out, err = main_inprocess(ONE_EPOCH + _filled(extra, files) + ["--output_dir", str(new)])
    one_line_error(code, out, err, *needles)
    assert out == "" and not (tmp_path / "new").exists()


def test_resume_of_another_model_leaves_the_run_as_it_was(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _tree(run)
    other = ["depth=2" if a == "depth=3" else a for a in ONE_EPOCH]  # one block fewer
    code, out, err = main_inprocess(other + ["--epochs", "2", "--output_dir", str(run)])
    one_line_error(code, out, err, "--model-kwargs", "'depth': 3", "'depth': 2")
    assert out == "" and _tree(run) == before


def test_dali_policy_refusal_moves_nothing(finished, real_image_set, tmp_path):
    pytest.importorskip("nvidia.dali")
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _tree(run)
    code, out, err = main_inprocess(ONE_EPOCH + ["--data-set", "FOLDER", "--data-path", str(real_image_set),
                                                 "--data-backend", "dali", "--aa", "rand-m9-mstd0.5",
                                                 "--overwrite", "--output_dir", str(run)])
    one_line_error(code, out, err, "inc1", "rand-m9-mstd0.5")
    assert out == "" and _tree(run) == before
    new = tmp_path / "fresh"
    code, out, err = main_inprocess(ONE_EPOCH + ["--data-set", "FOLDER", "--data-path", str(real_image_set),
                                                 "--data-backend", "dali", "--aa", "rand-m9-mstd0.5",
                                                 "--output_dir", str(new)])
    one_line_error(code, out, err, "inc1")
    assert out == "" and not new.exists()


def test_eval_refusal_prints_nothing_before_its_line(finished):
    code, out, err = main_inprocess(ONE_EPOCH + ["--eval", "--resume", str(finished / "missing.pth")])
    one_line_error(code, out, err, "checkpoint not found")
    assert out == ""


def test_rerunning_a_finished_run_says_so_and_writes_nothing(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _tree(run)
    code, out, err = main_inprocess(ONE_EPOCH + ["--output_dir", str(run)])
    assert code == 0 and err == "", err
    (line,) = out.strip().splitlines()
    assert line.startswith(f"already finished: {run / 'checkpoint.pth'} holds epoch 1 of 1"), line
    assert str(run / "log.txt") in line and "--epochs" in line and "to go" not in line and "done:" not in line
    assert _tree(run) == before  # no args.json rewritten, no TensorBoard file added


def test_a_checkpoint_replaced_before_the_lock_is_refused(tmp_path):
    """The resumed checkpoint is read before the folder is locked: one that another run rewrote in between is
    not continued from its stale copy (that would truncate the other run's newer log rows)."""
    from runtime import rundir

    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = folder / "checkpoint.pth"
    ckpt.write_bytes(b"epoch 4")
    seen = rundir.stamp(str(ckpt))
    tmp = folder / "new.tmp"
    tmp.write_bytes(b"epoch 5, longer")
    os.replace(tmp, ckpt)  # as checkpoint.save writes: a new file moved into place
    with pytest.raises(Exception, match="changed while this run was starting"):
        rundir.claim(str(folder), str(ckpt), False, seen)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pth"]  # the lock went with the refusal
    rundir.claim(str(folder), str(ckpt), False, rundir.stamp(str(ckpt))).release()
