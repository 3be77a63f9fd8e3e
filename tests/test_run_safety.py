"""Nothing a user already has is lost, and every mistake is one line: a fresh start over an earlier run stops
(--overwrite moves it aside), one live run per output folder (an OS lock, also under two ranks), --eval needs
weights, Ctrl-C / SIGTERM stop with one line and exit 130 keeping the last checkpoint, checkpoints of another
model name the changed flags or keys, and flags that would do nothing are refused before torch is imported."""
from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, child_env, hooked_main, main_inprocess, read_log, run_main
from conftest import one_line_error as _one_line_error

BASE = TINY + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "16", "--no-model-ema"]
ONE_EPOCH = BASE + ["--epochs", "1"]


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (but the lock) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


SIGNAL_SELF = "os.kill(os.getpid(), {signum})"
# tell the test we hold the folder, then wait until the test writes a line
PAUSE = "print('PAUSED', flush=True); sys.stdin.readline()"


def _start_paused(args: list) -> subprocess.Popen:
    """main.py ARGS stopped inside epoch 0 (after iteration 1) with its output folder locked."""
    proc = subprocess.Popen(hooked_main(0, 1, PAUSE) + args, cwd=ROOT, env=child_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # blocks until the line comes (or the process ends)
        if line.strip() == "PAUSED":
            return proc
    proc.wait(timeout=60)
    raise AssertionError(f"never paused: rc {proc.returncode}, {proc.stderr.read()[-2000:]}")


# ------------------------------------------------------------------------------------- house: no circle
def _repository_imports() -> dict:
    """{module: repository modules it imports anywhere in its source (also inside functions)}; a package
    (config/, toe/, models/, runtime/, training/, ...) counts as one module."""
    files = {p.stem: [p] for p in ROOT.glob("*.py")}
    for package in ("config", "toe", "models", "runtime", "training", "token_label", "dali_loader", "report"):
        files[package] = sorted((ROOT / package).glob("*.py"))
    graph = {}
    for name, paths in files.items():
        found = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_no_import_circle_among_the_repository_modules():
    graph = _repository_imports()
    assert "main" not in graph["training"] and "fail" in (ROOT / "runtime" / "errors.py").read_text()
    state: dict = {}

    def visit(node: str, path: list) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError(f"import circle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_packages_import_only_downwards():
    """toe/ <- runtime/ <- DeiT's modules <- training/ <- config/ <- main.py: no package imports one above it."""
    graph = _repository_imports()
    assert graph["toe"] == set()  # the library knows nothing of the repository
    assert graph["runtime"] <= {"toe"}, graph["runtime"]
    deit = {"engine", "datasets", "augment", "image_files", "samplers", "losses", "utils"}
    for module in deit:
        assert not graph[module] & {"training", "config", "main", "report"}, (module, graph[module])
    assert not graph["training"] & {"config", "main", "report"}, graph["training"]
    assert not graph["config"] & {"main", "report"}, graph["config"]


# ------------------------------------------------------------------------------- earlier run / --overwrite
def test_fresh_start_over_an_earlier_run_stops_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    code, stdout, err = main_inprocess(ONE_EPOCH + ["--output_dir", str(out)])
    assert code == 0, err
    assert "done: 1 epoch in" in stdout  # not "1 epochs"
    before = _snapshot(out)
    assert {"checkpoint.pth", "best_checkpoint.pth", "log.txt", "args.json"} <= set(before)

    for resume in (["--resume", "none"], ["--resume", str(tmp_path / "elsewhere.pth")]):
        if resume[1] != "none":
            (tmp_path / "elsewhere.pth").write_bytes((out / "checkpoint.pth").read_bytes())
        code, stdout, err = main_inprocess(ONE_EPOCH + resume + ["--output_dir", str(out)])
        _one_line_error(code, stdout, err, str(out), "already holds a run", "--overwrite")
        assert _snapshot(out) == before  # nothing replaced, truncated or added

    # a log.txt with rows but no checkpoint (deleted by hand) is a run too: --resume auto must not start over
    other = tmp_path / "log_only"
    other.mkdir()
    (other / "log.txt").write_text(json.dumps({"epoch": 0, "test_acc1": 1.0}) + "\n")
    _one_line_error(*main_inprocess(ONE_EPOCH + ["--output_dir", str(other)]), "log.txt")

    code, stdout, err = main_inprocess(ONE_EPOCH + ["--resume", "none", "--overwrite", "--output_dir", str(out)])
    assert code == 0, err
    (moved,) = [p for p in out.iterdir() if p.name.startswith("old-")]
    assert f"moved the earlier run's files to {moved}" in stdout
    assert _snapshot(moved) == {k: v for k, v in before.items()}  # every old file kept, byte for byte
    assert [r["epoch"] for r in read_log(out / "log.txt")] == [0]  # the new run starts at epoch 0
    assert "resumed from" not in stdout
    # --overwrite with --resume auto (the default) also starts fresh, keeping both earlier runs
    second = _snapshot(out)
    code, stdout, err = main_inprocess(ONE_EPOCH + ["--overwrite", "--output_dir", str(out)])
    assert code == 0 and "resumed from" not in stdout, err
    olds = sorted(p for p in out.iterdir() if p.name.startswith("old-"))
    assert len(olds) == 2 and _snapshot(olds[1]) == {k: v for k, v in second.items() if not k.startswith("old-")}


@pytest.mark.parametrize("extra, needles", [
    (["--overwrite"], ["--overwrite needs --output_dir"]),
    (["--overwrite", "--eval", "--finetune", "x.pth", "--output_dir", "o"], ["--overwrite", "--eval"]),
])
def test_overwrite_without_effect_is_refused(extra, needles):
    _one_line_error(*main_inprocess(ONE_EPOCH + extra), *needles)


def test_overwrite_refuses_to_move_the_checkpoint_it_resumes(tmp_path):
    out = tmp_path / "run"
    _one_line_error(*main_inprocess(ONE_EPOCH + ["--overwrite", "--resume", str(out / "checkpoint.pth"),
                                                 "--output_dir", str(out)]), "--overwrite moves")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- the lock
def test_second_run_in_a_live_runs_folder_stops_and_the_live_run_is_untouched(tmp_path):
    out = tmp_path / "live"
    live = _start_paused(BASE + ["--epochs", "2", "--output_dir", str(out)])
    try:
        before = _snapshot(out)
        for resume in ("auto", "none"):
            line = _one_line_error(*main_inprocess(BASE + ["--epochs", "2", "--resume", resume, "--output_dir",
                                                           str(out)]), "another run", str(out))
            assert f"host {socket.gethostname()} pid {live.pid}" in line, line
        assert _snapshot(out) == before
        live.stdin.write("\n")
        live.stdin.flush()
        live.stdin.close()
        assert live.wait(timeout=300) == 0, live.stderr.read()[-2000:]
    finally:
        if live.poll() is None:
            live.kill()
    assert [r["epoch"] for r in read_log(out / "log.txt")] == [0, 1]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not (out / ".lock").exists()  # a finished run removes its lock file


def test_a_killed_holder_never_blocks(tmp_path):
    out = tmp_path / "killed"
    holder = _start_paused(ONE_EPOCH + ["--output_dir", str(out)])
    holder.kill()
    holder.wait(timeout=60)
    assert (out / ".lock").read_text().split() == ["host", socket.gethostname(), "pid", str(holder.pid)]
    code, stdout, err = main_inprocess(ONE_EPOCH + ["--output_dir", str(out)])
    assert code == 0, err
    assert [r["epoch"] for r in read_log(out / "log.txt")] == [0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(command: list, args: list, timeout: float = 300) -> list:
    """Start rank 0 and 1 by hand (env:// rendezvous, as torchrun would) to see each one's exit code;
    returns [(code, stdout, stderr)] per rank."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = child_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(command + args, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


@pytest.mark.slow
def test_lock_under_two_ranks_stops_both_with_one_line(tmp_path):
    from runtime import rundir

    out = tmp_path / "held"
    lock = rundir.FolderLock(str(out))  # this test process is the live run
    try:
        results = _two_ranks([sys.executable, str(ROOT / "main.py")], ONE_EPOCH + ["--output_dir", str(out)])
    finally:
        lock.release()
    assert [code for code, _, _ in results] == [2, 2], [(c, e[-1500:]) for c, _, e in results]
    errors = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0] and "another run" in errors[0], errors
    assert not any("Traceback" in err for _, _, err in results)
    assert list(out.iterdir()) == []  # nothing written, and the lock file went with the lock


# ----------------------------------------------------------------------------------- Ctrl-C and SIGTERM
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_is_one_line_exit_130_and_keeps_the_last_checkpoint(signum, tmp_path):
    out = tmp_path / "stopped"
    args = BASE + ["--epochs", "2", "--output_dir", str(out)]
    proc = subprocess.run(hooked_main(1, 2, SIGNAL_SELF.format(signum=int(signum))) + args, cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    ckpt = out / "checkpoint.pth"
    assert proc.stderr.strip().splitlines() == [
        f"interrupted at epoch 1, iteration 2/4; rerun the same command to resume from {ckpt} "
        f"(last completed epoch 0)"]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    assert [r["epoch"] for r in read_log(out / "log.txt")] == [0]
    if signum == signal.SIGINT:
        again = run_main(args)  # "rerun the same command"
        assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
        assert [r["epoch"] for r in read_log(out / "log.txt")] == [0, 1]


def test_interrupt_hint_after_resume_none(tmp_path):
    """Rerunning a --resume none command would refuse the folder: the line says how to resume instead."""
    out = tmp_path / "none"
    proc = subprocess.run(hooked_main(1, 1, SIGNAL_SELF.format(signum=int(signal.SIGINT))) + BASE +
                          ["--epochs", "2", "--resume", "none", "--output_dir", str(out)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("interrupted at epoch 1, iteration 1/4; resume from") and "--resume auto" in line


@pytest.mark.slow
def test_sigterm_under_two_ranks_is_one_line_from_rank_0(tmp_path):
    out = tmp_path / "ddp"
    hook = hooked_main(1, 1, SIGNAL_SELF.format(signum=int(signal.SIGTERM)))  # both ranks, as a launcher does
    results = _two_ranks(hook, TINY + ["--data-set", "FAKE", "--fake-size", "64", "--batch-size", "8",
                                       "--epochs", "2", "--no-model-ema", "--output_dir", str(out)])
    assert [code for code, _, _ in results] == [130, 130], [(c, e[-1500:]) for c, _, e in results]
    lines = [line for _, _, err in results for line in err.splitlines() if line.startswith("interrupted")]
    assert lines == [f"interrupted at epoch 1, iteration 1/4; rerun the same command to resume from "
                     f"{out / 'checkpoint.pth'} (last completed epoch 0)"]
    assert not any("Traceback" in err for _, _, err in results)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0


# ------------------------------------------------------------------------------------------ --eval
def test_eval_without_weights_is_one_line(tmp_path):
    _one_line_error(*main_inprocess(ONE_EPOCH + ["--eval"]), "--eval needs weights")
    _one_line_error(*main_inprocess(ONE_EPOCH + ["--eval", "--output_dir", str(tmp_path / "empty")]),
                    "--eval needs weights", "checkpoint.pth")


# ----------------------------------------------------------------------------- checkpoints that do not fit
def test_checkpoint_of_another_model_names_the_changed_flags_or_keys(tmp_path):
    out = tmp_path / "run"
    code, _, err = main_inprocess(ONE_EPOCH + ["--output_dir", str(out)])
    assert code == 0, err
    ckpt = out / "checkpoint.pth"
    small = ["--model", "deit_small_patch16_224"]
    # training resume (auto) and --eval --resume FILE both name the flag, old and new value
    _one_line_error(*main_inprocess(ONE_EPOCH + small + ["--epochs", "2", "--output_dir", str(out)]),
                    "--model deit_tiny_patch16_224 -> deit_small_patch16_224")
    _one_line_error(*main_inprocess(ONE_EPOCH + ["--model-kwargs", "patch_size=4", "depth=2", "embed_dim=64",
                                                 "num_heads=2", "--eval", "--resume", str(ckpt)]),
                    "--model-kwargs", "'depth': 3", "'depth': 2", "does not fit")
    # bare weights (no flags recorded): the first mismatched keys and shapes
    state = torch.load(ckpt, weights_only=True)["model"]
    state["pos_embed"] = torch.zeros(1, 17, 64)
    del state["blocks.2.mlp.fc2.bias"]
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    line = _one_line_error(*main_inprocess(ONE_EPOCH + ["--eval", "--resume", str(bare)]), "bare.pth")
    assert "shape of pos_embed: (1, 17, 64) in the file, (1, 65, 64) in the model" in line
    assert "blocks.2.mlp.fc2.bias" in line and "Error(s) in loading" not in line


def test_teacher_of_another_architecture_names_keys_and_shapes(tmp_path):
    import timm

    teacher = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2,
                                embed_dim=32, num_heads=2)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    line = _one_line_error(*main_inprocess(ONE_EPOCH + [
        "--distillation-type", "soft", "--teacher-path", str(path), "--teacher-model", "deit_tiny_patch16_224",
        "--teacher-model-kwargs", "patch_size=4", "depth=2", "embed_dim=64", "num_heads=2"]),
        "teacher.pth", "--teacher-model deit_tiny_patch16_224")
    assert "shape of cls_token: (1, 1, 32) in the file, (1, 1, 64) in the model" in line, line


# ------------------------------------------------------------------------------------------- bad flags
BAD_FLAGS = [
    (["--opt-betas", "0.9"], ["--opt-betas takes 2 values", "got 1"]),
    (["--curriculum", "efficienttrain"], ["5 phases", "--epochs 3"]),
    (["--curriculum", "efficienttrain", "--epochs", "5", "--aa", "none"], ["--aa none"]),
    (["--curriculum", "efficienttrain", "--epochs", "5", "--ThreeAugment"], ["--ThreeAugment"]),
    (["--curriculum-table", "0:16:1,1:32:3", "--aa", "none"], ["--aa none"]),
    (["--curriculum-table", "0:16:1,3:32:3"], ["starts at or after --epochs 3"]),
    (["--curriculum-table", "0:16:1,1:24:3"], ["ends at size 24", "--input-size 32"]),
    (["--curriculum-table", "0:40:1,1:32:3"], ["40 is larger than --input-size 32"]),
    (["--curriculum-table", "0:16:11,1:32:3"], ["magnitude 11", "maximum of 10"]),
    (["--token-label-data", "/labels"], ["--token-label-data", "--token-label"]),
    (["--cls-weight", "0.5"], ["--cls-weight", "--token-label"]),
    (["--dense-weight", "0.5"], ["--dense-weight", "--token-label"]),
    (["--teacher-path", "t.pth"], ["--teacher-path", "--distillation-type none"]),
    (["--mixup", "-0.2"], ["--mixup must be >= 0"]),
    (["--cutmix", "-1"], ["--cutmix must be >= 0"]),
    (["--nb-classes", "1"], ["--nb-classes must be >= 2"]),
    (["--patch-size", "5"], ["patch size 5 does not divide --input-size 32"]),
    (["--input-size", "30"], ["patch size 4 does not divide --input-size 30"]),
]


def test_model_patch_size_not_dividing_the_input_size_is_one_line():
    argv = [a for a in BASE if a != "patch_size=4"] + ["--epochs", "1", "--input-size", "40"]  # deit: patch 16
    _one_line_error(*main_inprocess(argv), "patch size 16 of deit_tiny_patch16_224 does not divide --input-size 40")


@pytest.mark.parametrize("extra, needles", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_refused_flags_are_one_line(extra, needles, tmp_path):
    out = tmp_path / "never"
    _one_line_error(*main_inprocess(BASE + ["--epochs", "3"] + extra + ["--output_dir", str(out)]), *needles)
    assert not out.exists()


def test_output_dir_that_is_a_file_or_under_one(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _one_line_error(*main_inprocess(ONE_EPOCH + ["--output_dir", str(afile)]), str(afile), "is a file")
    _one_line_error(*main_inprocess(ONE_EPOCH + ["--output_dir", str(afile / "sub" / "run")]),
                    f"lies under {afile}")
    assert afile.read_text() == "not a folder"


def test_flag_refusals_fail_before_torch_is_imported(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [BASE + ["--epochs", "3"] + extra for extra, _ in BAD_FLAGS]
    cases += [ONE_EPOCH + ["--output_dir", str(afile)], ONE_EPOCH + ["--eval"]]
    code = ("import sys, main\n"
            f"for argv in {cases!r}:\n"
            "    assert main.main(argv) == 2, argv\n"
            "    assert 'torch' not in sys.modules, ('torch was imported before the error', argv)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(cases) and all(line.startswith("error: ") for line in lines), lines


# ----------------------------------------------------------------------------------------------- data
def test_empty_train_and_val_name_the_train_folder_first(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    line = _one_line_error(*main_inprocess(ONE_EPOCH + ["--data-set", "FOLDER", "--data-path",
                                                        str(tmp_path / "data")]), "empty image folder")
    assert str(tmp_path / "data" / "train") in line and str(tmp_path / "data" / "val") not in line


# ------------------------------------------------------------------------------------ train_input_size
def test_train_input_size_is_logged_without_a_curriculum_as_the_readme_says(tmp_path):
    out = tmp_path / "run"
    code, _, err = main_inprocess(ONE_EPOCH + ["--output_dir", str(out)])
    assert code == 0, err
    (row,) = read_log(out / "log.txt")
    assert row["train_input_size"] == 32 and "aa_magnitude" not in row
    readme = (ROOT / "docs" / "outputs.md").read_text()
    assert "`train_input_size` (every run" in readme
