"""The reproduction scripts (scripts/table*.sh) and the summarizer (scripts/summarize.py).

* DRY_RUN: the printed Table 2 commands are parsed with main.py's own parser and checked against the paper's
  setting (300 epochs, global batch 1024, lr 5e-4 x 1024/512, r1 0.5, Ng 3, k 2); the batch split and the
  multi-node flags are checked for several GPU counts; the other tables' commands carry their ablation flags.
* SMOKE: every script runs every command for one epoch with a tiny model on CPU (all queued into one python
  process with SMOKE_DEFER to stay within the CI budget); the runs it produces are exactly the runs DRY_RUN
  lists; summarize.py then prints the tables, and its numbers are checked against the logs read here.
* Plots: written and non-empty when matplotlib imports; a clear message and no crash when it does not.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TABLES = ["table2_deit", "table3_lvvit", "table5_cifar", "table6_hparams", "table7_ablation", "table8_layer",
          "table9_distance"]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATA", "OUT", "NGPUS", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "MAX_BATCH_PER_GPU", "DRY_RUN", "SMOKE", "SMOKE_DEFER", "ONLY", "TOKEN_LABEL_DATA",
                        "IMAGENET", "AMP", "WORKERS", "FIG4_R1")}
    env.update(extra)
    return env


def _bash(script: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / f"{script}.sh")], cwd=ROOT, env=_env(**env), text=True,
                          capture_output=True, timeout=timeout)


def _dry_commands(script: str, **env: str) -> List[List[str]]:
    """DRY_RUN=1 output of a script -> the torchrun command lines, tokenised."""
    res = _bash(script, DRY_RUN="1", DATA="/data/in", OUT="/runs/out", **env)
    assert res.returncode == 0, res.stderr
    return [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("torchrun ")]


def _main_argv(cmd: List[str]) -> List[str]:
    return cmd[cmd.index("main.py") + 1:]


def _launcher(cmd: List[str]) -> Dict[str, str]:
    head = cmd[1:cmd.index("main.py")]
    return dict(zip(head[0::2], head[1::2]))


def _parse_main(cmd: List[str]):
    import main

    return main.get_args_parser().parse_args(_main_argv(cmd))


def _flag(cmd: List[str], flag: str) -> Optional[str]:
    """Last value of ``flag`` in a tokenised command (argparse keeps the last one)."""
    argv = _main_argv(cmd)
    vals = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == flag]
    return vals[-1] if vals else None


# ============================================================================================ DRY_RUN
def test_dry_run_table2_matches_the_paper_setting():
    cmds = _dry_commands("table2_deit", NGPUS="4")
    assert len(cmds) == 7
    seen = set()
    for cmd in cmds:
        launch = _launcher(cmd)
        args = _parse_main(cmd)
        world = int(launch["--nproc_per_node"]) * int(launch["--nnodes"])
        global_batch = args.batch_size * world * args.grad_accum_steps
        assert global_batch == 1024
        assert (args.batch_size, args.grad_accum_steps, world) == (256, 1, 4)
        assert args.epochs == 300
        assert args.lr == 5e-4 and not args.unscale_lr
        assert math.isclose(args.lr * global_batch / 512, 1e-3)  # what main.py trains with
        assert (args.opt, args.weight_decay, args.sched, args.warmup_epochs) == ("adamw", 0.05, "cosine", 5)
        assert (args.mixup, args.cutmix, args.smoothing, args.drop_path, args.reprob) == (0.8, 1.0, 0.1, 0.1, 0.25)
        assert args.repeated_aug and args.aa == "rand-m9-mstd0.5-inc1" and args.data_set == "IMNET"
        assert args.data_path == "/data/in"
        if args.toe_r1 is not None:
            assert (args.toe_ng, args.toe_k, args.toe_layer) == (3, 2, 1)
            assert math.isclose(args.toe_r0, args.toe_r1 / 2)
            assert (args.toe_distance, args.toe_init, args.toe_no_expand, args.toe_no_merge) == \
                ("cosine", "spatial", False, False)
        seen.add((args.model, args.toe_r1))
        assert args.output_dir.startswith("/runs/out/table2/")
    assert seen == {("deit_tiny_patch16_224", None), ("deit_tiny_patch16_224", 0.5),
                    ("deit_small_patch16_224", None), ("deit_small_patch16_224", 0.5),
                    ("deit_base_patch16_224", None), ("deit_base_patch16_224", 0.5),
                    ("deit_base_patch16_224", 0.4)}
    assert len({_flag(c, "--output_dir") for c in cmds}) == 7


@pytest.mark.parametrize("ngpus,nnodes,max_batch,batch,accum", [
    ("1", "1", "256", 256, 4), ("2", "1", "128", 128, 4), ("8", "1", "256", 128, 1), ("8", "2", "256", 64, 1),
    ("4", "1", "100", 64, 4)])
def test_dry_run_keeps_the_global_batch(ngpus, nnodes, max_batch, batch, accum):
    cmds = _dry_commands("table2_deit", NGPUS=ngpus, NNODES=nnodes, MAX_BATCH_PER_GPU=max_batch,
                         MASTER_ADDR="10.1.2.3", NODE_RANK=str(int(nnodes) - 1), MASTER_PORT="29999")
    for cmd in cmds:
        launch = _launcher(cmd)
        assert launch == {"--nproc_per_node": ngpus, "--nnodes": nnodes, "--node_rank": str(int(nnodes) - 1),
                          "--master_addr": "10.1.2.3", "--master_port": "29999"}
        assert (int(_flag(cmd, "--batch-size")), int(_flag(cmd, "--grad-accum-steps"))) == (batch, accum)
        assert batch * accum * int(ngpus) * int(nnodes) == 1024


def test_bad_environment_is_one_line_exit_2():
    res = _bash("table2_deit", DRY_RUN="1", NGPUS="3")  # 1024 is not divisible by 3 GPUs
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "divisible" in res.stderr
    res = _bash("table2_deit", OUT="/tmp/x")  # a real run needs DATA
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: set DATA to the ImageNet root (train/ and val/ class folders)"
    res = _bash("table8_layer", DRY_RUN="1", NGPUS="four")
    assert res.returncode == 2 and "NGPUS" in res.stderr and res.stderr.count("\n") == 1


def test_dry_run_ablation_flags():
    t6 = _dry_commands("table6_hparams")
    r0 = sorted(float(_flag(c, "--toe-r0")) / float(_flag(c, "--toe-r1")) for c in t6 if _flag(c, "--toe-r1"))
    assert any(math.isclose(x, 1 / 3, rel_tol=1e-6) for x in r0) and any(math.isclose(x, 2 / 3, rel_tol=1e-6) for x in r0)
    assert sorted(_flag(c, "--toe-ng") for c in t6 if _flag(c, "--toe-r1")).count("2") == 1
    assert {_flag(c, "--toe-k") for c in t6 if _flag(c, "--toe-r1")} == {"1", "2", "3"}
    assert {_flag(c, "--toe-r1") for c in t6 if _flag(c, "--toe-r1")} == {"0.4", "0.5", "0.6"}  # with Fig. 4

    t7 = _dry_commands("table7_ablation")
    rand = [c for c in t7 if _flag(c, "--toe-init") == "random"]
    assert len(rand) == 6 and all("--toe-no-expand" in c for c in rand)
    assert sorted(_flag(c, "--seed") for c in rand) == ["0", "0", "1", "1", "2", "2"]
    assert sum("--toe-no-merge" in c for c in t7) == 2 and sum("--toe-no-expand" in c for c in t7) == 8

    assert sorted(_flag(c, "--toe-layer") for c in _dry_commands("table8_layer")) == ["0", "1", "2", "3"]
    assert sorted(_flag(c, "--toe-distance") for c in _dry_commands("table9_distance")) == \
        ["cosine", "cosine", "euclidean", "euclidean", "manhattan", "manhattan"]

    t3 = _dry_commands("table3_lvvit", TOKEN_LABEL_DATA="/labels")
    assert {_flag(c, "--model") for c in t3} == {"lvvit_t", "lvvit_s", "lvvit_m"} and len(t3) == 6
    for c in t3:
        assert "--token-label" in c and "--mix-token" in c and "--model-ema" in c and "--unscale-lr" in c
        assert _flag(c, "--token-label-data") == "/labels" and _flag(c, "--epochs") == "300"
        assert _flag(c, "--toe-r1") in (None, "0.4")

    t5 = _dry_commands("table5_cifar")
    ft = [c for c in t5 if _flag(c, "--finetune")]
    assert len(ft) == 16 and len(t5) == 20  # + Table 2's four pre-training runs
    assert {(_flag(c, "--data-set"), _flag(c, "--finetune").split("/")[-2], _flag(c, "--toe-r1")) for c in ft} == {
        (ds, f"deit_{s}_{pre}", r1) for ds in ("CIFAR10", "CIFAR100") for s in ("tiny", "small")
        for pre in ("baseline", "toe_r1_0.5") for r1 in (None, "0.5")}
    for c in ft:
        launch = _launcher(c)
        assert int(_flag(c, "--batch-size")) * int(_flag(c, "--grad-accum-steps")) * \
            int(launch["--nproc_per_node"]) == 768
        assert (_flag(c, "--opt"), _flag(c, "--lr"), _flag(c, "--epochs")) == ("sgd", "0.01", "1000")


def test_only_filter():
    cmds = _dry_commands("table7_ablation", ONLY="deit_small_.*seed")
    assert [c[-1].rsplit("/", 1)[1] for c in cmds] == [f"deit_small_random_noexpand_seed{i}" for i in range(3)]


# ============================================================================================== SMOKE
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every script with SMOKE=1, queued (SMOKE_DEFER) and run in one python process."""
    base = tmp_path_factory.mktemp("smoke")
    out, queue = base / "out", base / "queue"
    for script in TABLES:
        res = _bash(script, SMOKE="1", SMOKE_DEFER=str(queue), OUT=str(out))
        assert res.returncode == 0, f"{script}: {res.stderr}"
    flush = subprocess.run(["bash", "-c", "source scripts/common.sh && smoke_flush now"], cwd=ROOT,
                           env=_env(SMOKE="1", SMOKE_DEFER=str(queue), OUT=str(out)), text=True,
                           capture_output=True, timeout=600)
    return {"out": out, "flush": flush, "base": base}


def _log(run: Path) -> List[dict]:
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines() if line.strip()]


def test_smoke_runs_every_command_of_every_script(smoke):
    flush = smoke["flush"]
    assert flush.returncode == 0, flush.stdout[-3000:] + flush.stderr[-3000:]
    out = smoke["out"]
    # the runs SMOKE made are exactly the runs DRY_RUN lists, each with its one epoch logged
    expected = set()
    for script in TABLES:
        res = _bash(script, DRY_RUN="1", DATA="/d", OUT=str(out), TOKEN_LABEL_DATA="/l")
        expected |= {_flag(shlex.split(line), "--output_dir") for line in res.stdout.splitlines()
                     if line.startswith("torchrun ")}
    made = {str(p.parent) for p in out.rglob("log.txt")}
    assert made == expected
    for run in made:
        rows = _log(Path(run))
        assert [r["epoch"] for r in rows] == [0] and 0 <= rows[0]["test_acc1"] <= 100
    assert flush.stdout.count(": exit 0 in ") == len(made) + 1  # + the token-label generation
    # ToE really ran in the ToE runs: stage 1 keeps r1 of the 8x8 patches
    r = _log(out / "table2" / "deit_tiny_toe_r1_0.5")[0]
    assert (r["toe_keep_rate"], r["toe_tokens"], r["num_patches"]) == (0.5, 32, 64)
    assert _log(out / "table8" / "deit_tiny_layer3")[0]["toe_tokens"] == 32


def test_smoke_rerun_skips_complete_runs(smoke):
    res = _bash("table8_layer", SMOKE="1", OUT=str(smoke["out"]))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("complete (1 epochs") == 4 and "[smoke] table8/" not in res.stdout


def _summarize_module():
    spec = importlib.util.spec_from_file_location("toe_summarize", SCRIPTS / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summarize_prints_the_tables(smoke, tmp_path):
    out = smoke["out"]
    md, js = tmp_path / "tables.md", tmp_path / "cells.json"
    res = subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), str(out), "--markdown", str(md),
                          "--json", str(js)], cwd=ROOT, text=True, capture_output=True, timeout=600,
                         env=_env(OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for title in ("Table 2. DeiT on ImageNet-1K", "Table 3. LV-ViT", "Table 5. Fine-tuning DeiT on CIFAR-10/100",
                  "Table 6.", "Table 7.", "Table 8.", "Table 9."):
        assert title in text and f"### {title}" in md.read_text()
    cells = {t["table"]: t["cells"] for t in json.loads(js.read_text())["tables"]}

    # Table 2, DeiT-tiny: top-1 = best logged test_acc1, GPU hours = sum(epoch_time) x 1 process / 3600
    base_run, toe_run = out / "table2" / "deit_tiny_baseline", out / "table2" / "deit_tiny_toe_r1_0.5"
    base, toe_ = cells["2"]["DeiT-tiny Baseline"], cells["2"]["DeiT-tiny ToE r1=0.5"]
    assert base["runs"] == [str(base_run)] and toe_["runs"] == [str(toe_run)]
    for cell, run in ((base, base_run), (toe_, toe_run)):
        rows = _log(run)
        assert math.isclose(cell["top1"], max(r["test_acc1"] for r in rows))
        assert math.isclose(cell["gpu_hours"], sum(r["epoch_time"] for r in rows) / 3600)
    # GFLOPs: the baseline's equals what main.py logged (same thop count, no schedule); ToE's is lower
    assert math.isclose(base["gflops"], _log(base_run)[0]["gflops_per_iter"], rel_tol=1e-6)
    assert toe_["gflops"] < base["gflops"]
    row = next(l for l in text.splitlines() if l.startswith("DeiT-tiny") and "ToE r1=0.5" in l)
    assert f"{toe_['top1']:.2f} ({toe_['top1'] - base['top1']:+.2f})" in row
    assert "72.6 (+0.4)" in row and "2.6e3 (1.27x)" in row and "44.2h" in row and "1.24x" in row
    acc = base["gpu_hours"] / toe_["gpu_hours"]
    assert f"{acc:.2f}x" in row and f"({base['gflops'] / toe_['gflops']:.2f}x)" in row

    # Table 3 uses the EMA top-1 of the token-labeling runs
    lv = cells["3"]["LV-ViT-S ToE r1=0.4"]
    assert lv["runs"] == [str(out / "table3" / "lvvit_s_toe_r1_0.4")]
    assert math.isclose(lv["top1"], max(r["ema_test_acc1"] for r in _log(Path(lv["runs"][0]))))

    # Table 5: the fine-tuning source is read from the --finetune checkpoint's own args
    for key, cell in cells["5"].items():
        group, rest = key.split(" ", 1)
        size = group.split("-")[1]
        pre = "toe" if rest.startswith("pre ToE") else "baseline"
        ft = "toe_r1_0.5" if "ft ToE" in rest else "baseline"
        ds = rest.rsplit(" ", 1)[1]
        assert cell["runs"] == [str(out / "table5" / f"deit_{size}_{ds}_pre_{pre}_ft_{ft}")]

    # Table 7: the three random-init seeds are one cell, mean +- sample std
    rnd = cells["7"]["Random init, no expansion, merge DeiT-tiny"]
    accs = [max(r["test_acc1"] for r in _log(Path(p))) for p in rnd["runs"]]
    assert len(accs) == 3 and math.isclose(rnd["top1"], sum(accs) / 3)
    mean = sum(accs) / 3
    assert math.isclose(rnd["top1_std"], math.sqrt(sum((a - mean) ** 2 for a in accs) / 2), abs_tol=1e-9)

    # Table 8: the later ToE acts, the more blocks run on all tokens
    gf = [cells["8"][k]["gflops"] for k in ("Embedding (layer 0)", "First block (layer 1)",
                                          "Second block (layer 2)", "Third block (layer 3)")]
    assert gf == sorted(gf) and len(set(gf)) == 4
    # Table 6/9 cells are filled by their own runs plus Table 2's shared default
    assert cells["6"]["default (1/2, 3, 2)"]["runs"] == [str(toe_run)]
    assert cells["9"]["Cosine distance DeiT-tiny"]["runs"] == [str(toe_run)]
    assert all(c["runs"] for t in ("6", "7", "8", "9") for c in cells[t].values())


def test_summarize_plots(smoke, tmp_path, capsys):
    summarize = _summarize_module()
    plots = tmp_path / "plots"
    rc = summarize.main([str(smoke["out"] / "table2"), str(smoke["out"] / "table6"), "--tables", "2",
                         "--no-flops", "--plots", str(plots)])
    err = capsys.readouterr().err
    assert rc == 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in err and not plots.exists()
        return
    names = sorted(p.name for p in plots.iterdir())
    assert names == sorted(f"fig{f}_deit_{s}_patch16_224.png" for s in ("base", "small", "tiny") for f in (3, 4))
    for p in plots.iterdir():
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_summarize_without_matplotlib(smoke, tmp_path, capsys, monkeypatch):
    summarize = _summarize_module()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    plots = tmp_path / "plots"
    rc = summarize.main([str(smoke["out"] / "table8"), "--tables", "8", "--no-flops", "--plots", str(plots)])
    captured = capsys.readouterr()
    assert rc == 0 and "Table 8." in captured.out
    assert captured.err.strip().splitlines() == [
        "summarize.py: matplotlib is not installed, so no plots were drawn (pip install matplotlib)"]
    assert not plots.exists()


def test_summarize_bad_input(tmp_path):
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), *argv], cwd=ROOT, text=True,
                              capture_output=True, timeout=120)

    for argv, needle in (([str(tmp_path / "missing")], "no such file or directory"),
                         ([str(tmp_path)], "no log.txt under"),
                         ([str(tmp_path), "--tables", "4"], "unknown table 4"),
                         ([], "the following arguments are required")):
        res = run(*argv)
        assert res.returncode == 2, (argv, res.stderr)
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr
        assert res.stderr.startswith("summarize.py: error: ") and "Traceback" not in res.stderr
    # a log.txt without args (no args.json, no checkpoint): skipped with a warning -> nothing readable -> 2
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text(json.dumps({"epoch": 0, "test_acc1": 1.0}) + "\n")
    res = run(str(tmp_path))
    assert res.returncode == 2 and "no readable run" in res.stderr.splitlines()[-1]
