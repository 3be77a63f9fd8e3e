"""The reproduction scripts (scripts/table*.sh, scripts/quickstart.sh) and summarize.py on their SMOKE runs.

* DRY_RUN: the printed commands are parsed with main.py's own parser and checked against the paper's
  setting (Table 2: 300 epochs, global batch 1024, lr 5e-4 x 1024/512, r1 0.5, Ng 3, k 2; Table 3: LV-ViT's
  dense weight 1.0, lr 1.6e-3; Table 5: no random erasing / drop path, batch 768; Table 9: both --toe-compat
  variants), every recipe flag of main.py is spelled out once, the batch split, multi-node flags, the
  TOE_COMPAT switch and bad environments (one `error:` line, exit 2).
* SMOKE: every script runs every command for one epoch with a tiny model on CPU (all queued into one python
  process with SMOKE_DEFER to stay within the CI budget); the runs it produces are exactly the runs DRY_RUN
  lists, their args.json hold the flags the scripts passed and their logs the tokens toe.Schedule keeps;
  summarize.py then puts them in "Your runs" (they fit no paper table) with each ToE run next to its baseline.
Paper-table filling is tested on synthetic runs in tests/test_summarize.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TABLES = ["table2_deit", "table3_lvvit", "table5_cifar", "table6_hparams", "table7_ablation", "table8_layer",
          "table9_distance", "table4_efficienttrain"]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATA", "OUT", "NGPUS", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "MAX_BATCH_PER_GPU", "DRY_RUN", "SMOKE", "SMOKE_DEFER", "ONLY", "TOKEN_LABEL_DATA",
                        "IMAGENET", "AMP", "WORKERS", "FIG4_R1", "TOE_COMPAT", "TORCHRUN", "EPOCHS",
                        "FAKE_SIZE", "BATCH", "QS_DATA", "DEVICE")
           and not k.startswith(("CIFAR_", "LVVIT_"))}
    env["PYTHON"] = sys.executable  # the scripts run this interpreter, not whichever python PATH finds
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
        assert args.data_path == "/data/in" and args.curriculum == "none" and args.train_mode
        if args.toe_r1 is not None:
            assert (args.toe_ng, args.toe_k, args.toe_layer, args.toe_epochs) == (3, 2, 1, 300)
            assert math.isclose(args.toe_r0, args.toe_r1 / 2)
            # the DeiT-base r1 = 0.4 row was published from the official code: official op by default
            compat = "official" if args.toe_r1 == 0.4 else "none"
            assert (args.toe_distance, args.toe_init, args.toe_no_expand, args.toe_no_merge, args.toe_compat) == \
                ("cosine", "spatial", False, False, compat)
            assert "--toe-compat" in cmd  # spelled out, not left to the default
        seen.add((args.model, args.toe_r1))
        assert args.output_dir.startswith("/runs/out/table2/")
    assert seen == {("deit_tiny_patch16_224", None), ("deit_tiny_patch16_224", 0.5),
                    ("deit_small_patch16_224", None), ("deit_small_patch16_224", 0.5),
                    ("deit_base_patch16_224", None), ("deit_base_patch16_224", 0.5),
                    ("deit_base_patch16_224", 0.4)}
    assert len({_flag(c, "--output_dir") for c in cmds}) == 7


def test_toe_compat_official_switch():
    default, none = _dry_commands("table2_deit"), _dry_commands("table2_deit", TOE_COMPAT="none")
    assert default == _dry_commands("table2_deit", TOE_COMPAT="official")  # official is Table 2's default
    assert default[:-1] == none[:-1]  # only DeiT-base r1 = 0.4 changes: replaced, not added (7 runs)
    assert len(default) == len(none) == 7
    assert _flag(default[-1], "--toe-compat") == "official" and _flag(none[-1], "--toe-compat") == "none"
    assert _flag(default[-1], "--output_dir").endswith("/table2/deit_base_toe_r1_0.4_official")
    assert _flag(none[-1], "--output_dir").endswith("/table2/deit_base_toe_r1_0.4")
    assert _parse_main(default[-1]).toe_compat == "official"

    t4, t4_none = _dry_commands("table4_efficienttrain"), _dry_commands("table4_efficienttrain", TOE_COMPAT="none")
    assert t4 == _dry_commands("table4_efficienttrain", TOE_COMPAT="official") and len(t4) == len(t4_none) == 6
    for cmds, compat, suffix in ((t4, "official", "_official"), (t4_none, "none", "")):
        toe_runs = [c for c in cmds if _flag(c, "--toe-r1")]
        assert [_flag(c, "--toe-compat") for c in toe_runs] == [compat, compat]
        assert all(_flag(c, "--output_dir").endswith(f"_efficienttrain_toe_r1_0.6{suffix}") for c in toe_runs)

    # Table 3 defaults to the official code it was published from; TOE_COMPAT=none runs the paper's equations
    for env, compat, loss, suffix in (({}, "official", "zero", "_official"), ({"TOE_COMPAT": "none"}, "none",
                                                                              "merged", "")):
        t3 = _dry_commands("table3_lvvit", TOKEN_LABEL_DATA="/labels", **env)
        toe_runs = [c for c in t3 if _flag(c, "--toe-r1")]
        assert len(toe_runs) == 3 and len(t3) == 6
        for c in toe_runs:
            assert (_flag(c, "--toe-compat"), _flag(c, "--toe-dense-loss")) == (compat, loss)
            assert _flag(c, "--output_dir").endswith(f"_toe_r1_0.4{suffix}")
        assert all(_flag(c, "--toe-compat") is None for c in t3 if not _flag(c, "--toe-r1"))


def test_dry_run_table4_is_the_official_efficienttrain_recipe():
    cmds = _dry_commands("table4_efficienttrain", NGPUS="8")
    assert len(cmds) == 6
    names = [_flag(c, "--output_dir").rsplit("/", 1)[1] for c in cmds]
    assert names == [f"deit_{s}_{run}" for s in ("tiny", "small")
                     for run in ("baseline", "efficienttrain", "efficienttrain_toe_r1_0.6_official")]
    for cmd, name in zip(cmds, names):
        args = _parse_main(cmd)
        global_batch = args.batch_size * 8 * args.grad_accum_steps
        assert global_batch == 4096 and math.isclose(args.lr * global_batch / 512, 4e-3) and not args.unscale_lr
        assert (args.epochs, args.clip_grad, args.opt, args.weight_decay, args.drop_path) == \
            (300, 5.0, "adamw", 0.05, 0.1)
        # the official EfficientTrain + ToE code: no repeated augmentation, no EMA, lr per iteration from 0 to
        # the peak over 20 epochs, then cosine down to 1e-6
        assert not args.repeated_aug and not args.model_ema
        assert "--ra-reps" not in cmd and "--model-ema-decay" not in cmd and "--repeated-aug" not in cmd
        assert args.sched_on_updates and args.sched == "cosine"
        assert (args.warmup_epochs, args.warmup_lr, args.min_lr) == (20, 0.0, 1e-6)
        if name.endswith("baseline"):
            assert args.curriculum == "none" and args.toe_r1 is None
            continue
        assert (args.curriculum, args.curriculum_downsample, args.curriculum_batch_scale) == \
            ("efficienttrain", "fourier", True)
        if args.toe_r1 is not None:
            assert (args.toe_r1, args.toe_r0, args.toe_ng, args.toe_k, args.toe_layer) == (0.6, 0.3, 3, 2, 1)
            assert (args.toe_stage_epochs, args.toe_epochs, args.toe_compat) == (["0", "100", "200"], 300, "official")


def test_dry_run_table3_lvvit_recipe():
    t3 = _dry_commands("table3_lvvit", TOKEN_LABEL_DATA="/labels")
    assert {_flag(c, "--model") for c in t3} == {"lvvit_t", "lvvit_s", "lvvit_m"}
    for c in t3:
        args = _parse_main(c)
        assert args.token_label and args.mix_token and args.model_ema and args.unscale_lr
        assert args.token_label_data == "/labels" and args.epochs == 300
        assert (args.cls_weight, args.dense_weight, args.token_label_size) == (1.0, 1.0, 14)
        assert "--dense-weight" in c and args.toe_r1 in (None, 0.4)
        lr_dp = {"lvvit_t": (1.6e-3, 0.1), "lvvit_s": (1.6e-3, 0.1), "lvvit_m": (1.6e-3, 0.2)}[args.model]
        assert (args.lr, args.drop_path) == lr_dp
        assert args.model_ema_decay == 0.99992 and not args.repeated_aug and (args.mixup, args.cutmix) == (0, 0)
        # TokenLabeling's timm loop: 300 cosine epochs + 10 at min lr; random interpolation; LV-ViT's crop_pct
        assert (args.epochs, args.cooldown_epochs, args.train_cooldown, args.sched) == (300, 10, True, "cosine")
        assert args.train_interpolation == "random"
        assert args.eval_crop_ratio == {"lvvit_t": 0.9, "lvvit_s": 0.9, "lvvit_m": 1.0}[args.model]
        if args.toe_r1 is not None:  # the official op by default, and its dense loss; stages span 300 epochs
            assert (args.toe_compat, args.toe_dense_loss, args.toe_epochs) == ("official", "zero", 300)


def test_table3_run_is_complete_after_its_cooldown_epochs(tmp_path):
    """--train-cooldown runs log 310 epochs: one stopped after epoch 299 is resumed, not skipped."""
    out, data, labels = tmp_path / "out", tmp_path / "imagenet", tmp_path / "labels"
    data.mkdir()
    labels.mkdir()
    _write_complete_log(out / "table3/lvvit_t_baseline", 310)
    _write_complete_log(out / "table3/lvvit_s_baseline", 300)
    res = _bash("table3_lvvit", OUT=str(out), DATA=str(data), TOKEN_LABEL_DATA=str(labels), NGPUS="8",
                TORCHRUN="echo", ONLY="baseline")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(": complete (310 epochs in ") == 1 and "table3/lvvit_t_baseline: complete" in res.stdout
    launched = [line for line in res.stdout.splitlines() if line.startswith("--nproc_per_node")]
    assert len(launched) == 2 and "lvvit_s_baseline" in launched[0] and "lvvit_m_baseline" in launched[1]


def test_dry_run_table5_cifar_recipe():
    t5 = _dry_commands("table5_cifar")
    ft = [c for c in t5 if _flag(c, "--finetune")]
    assert len(ft) == 16 and len(t5) == 20  # + Table 2's four pre-training runs
    assert {(_flag(c, "--data-set"), _flag(c, "--finetune").split("/")[-2], _flag(c, "--toe-r1")) for c in ft} == {
        (ds, f"deit_{s}_{pre}", r1) for ds in ("CIFAR10", "CIFAR100") for s in ("tiny", "small")
        for pre in ("baseline", "toe_r1_0.5") for r1 in (None, "0.5")}
    for c in ft:
        launch, args = _launcher(c), _parse_main(c)
        assert args.batch_size * args.grad_accum_steps * int(launch["--nproc_per_node"]) == 768
        assert (args.opt, args.lr, args.unscale_lr, args.epochs, args.weight_decay) == ("sgd", 0.01, True, 1000, 1e-4)
        # DeiT's transfer recipe: no random erasing, no stochastic depth
        assert (args.reprob, args.drop_path) == (0.0, 0.0)
        assert args.toe_epochs in (None, 1000)
    for c in t5:
        if not _flag(c, "--finetune"):  # the ImageNet pre-training keeps DeiT's 0.25 / 0.1
            assert (_flag(c, "--reprob"), _flag(c, "--drop-path")) == ("0.25", "0.1")
    # 768 = 3 x 256: three GPUs split it, five do not
    assert int(_flag(_dry_commands("table5_cifar", NGPUS="3", ONLY="table5/")[-1], "--batch-size")) == 256
    res = _bash("table5_cifar", DRY_RUN="1", NGPUS="5", ONLY="table5/")
    assert res.returncode == 2 and "its global batch 768 is not divisible by NGPUS x NNODES = 5 x 1 = 5" in res.stderr


def test_dry_run_table9_runs_both_variants():
    t9 = _dry_commands("table9_distance")
    got = sorted((_flag(c, "--model"), _flag(c, "--toe-distance"), _flag(c, "--toe-compat")) for c in t9)
    assert got == sorted((f"deit_{s}_patch16_224", d, v) for s in ("tiny", "small")
                         for d in ("cosine", "euclidean", "manhattan") for v in ("none", "official"))
    names = {_flag(c, "--output_dir").split("/out/")[1] for c in t9}
    assert "table2/deit_tiny_toe_r1_0.5" in names and "table9/deit_small_manhattan_official" in names
    assert "table9/deit_small_manhattan" in names and "table9/deit_tiny_cosine_official" in names


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


@pytest.mark.parametrize("env,message", [
    ({"NGPUS": "3"}, "error: table2/deit_tiny_baseline: its global batch 1024 is not divisible by NGPUS x NNODES "
                     "= 3 x 1 = 3 GPUs; use a GPU count that divides 1024"),
    ({"NGPUS": "four"}, "error: NGPUS must be a positive integer, got 'four'"),
    ({"NNODES": "2", "NODE_RANK": "1"}, "error: NNODES=2 needs MASTER_ADDR, the address of the NODE_RANK=0 node "
                                        "(the same on every node)"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"},
     "error: NODE_RANK must be in [0, NNODES-1], got '2'"),
    ({"TOE_COMPAT": "paper"}, "error: TOE_COMPAT must be none or official, got 'paper'")])
def test_bad_environment_is_one_line_exit_2(env, message):
    res = _bash("table2_deit", DRY_RUN="1", **env)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", message + "\n")


def test_real_run_needs_data():
    res = _bash("table2_deit", OUT="/tmp/x")
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: set DATA to the ImageNet root (train/ and val/ class folders)"


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


def test_each_flag_once():
    """An ablation replaces the recipe's value instead of repeating the flag (the command reads as run)."""
    for script in TABLES:
        for cmd in _dry_commands(script, TOKEN_LABEL_DATA="/l"):
            flags = [t for t in _main_argv(cmd) if t.startswith("--")]
            assert len(flags) == len(set(flags)), (script, [f for f in flags if flags.count(f) > 1])


# main.py flags a table command may leave out: where it reads/writes, how it runs and logs, switches that are
# off unless given (no "off" spelling), flags of what a recipe does not use; checked against main.py's parser,
# so a new recipe flag in main.py fails here until the scripts spell it out.
NOT_SPELLED = {
    "run": {"device", "dist_url", "local_rank", "eval", "throughput", "resume", "resume_changed_ok", "start_epoch",
            "print_freq", "compile", "compile_backend", "grad_checkpointing", "model_ema_force_cpu", "opt_impl",
            "persistent_workers", "data_backend",
            "prefetch_factor", "skip_bad_images", "world_size", "fake_size", "nb_classes", "inat_category",
            "model_kwargs", "patch_size"},
    "off": {"ThreeAugment", "attn_only", "bce_loss", "clip_grad", "cutmix_minmax", "curriculum_table", "lr_noise",
            "opt_betas", "resplit", "src", "toe_stage_epochs", "toe_sparse_eval", "token_label_gt", "toe_no_expand",
            "toe_no_merge", "unscale_lr", "token_label", "finetune", "curriculum_batch_scale", "sched_on_updates",
            "train_cooldown", "overwrite"},
    "unused": {"lr_noise_pct", "lr_noise_std", "distillation_alpha", "distillation_tau", "teacher_model",
               "teacher_model_kwargs", "teacher_path"},
    "token_label_only": {"cls_weight", "dense_weight", "mix_token", "token_label_data", "token_label_size",
                         "token_label_target", "toe_dense_loss"},
    "mixup_only": {"mixup_mode", "mixup_prob", "mixup_switch_prob"},
    "toe_only": {"toe_r1", "toe_r0", "toe_ng", "toe_k", "toe_layer", "toe_distance", "toe_init", "toe_epochs",
                 "toe_compat", "toe_dense_loss"},
}


def test_every_recipe_flag_is_spelled_out():
    import main

    dests = {a.dest for a in main.get_args_parser()._actions if a.dest != "help"}
    for script in TABLES:
        for cmd in _dry_commands(script, TOKEN_LABEL_DATA="/l"):
            given = set(_parse_flags(_main_argv(cmd)))
            allowed = NOT_SPELLED["run"] | NOT_SPELLED["off"] | NOT_SPELLED["unused"]
            if "token_label" not in given:
                allowed |= NOT_SPELLED["token_label_only"]
            if _flag(cmd, "--mixup") == "0" and _flag(cmd, "--cutmix") == "0":
                allowed |= NOT_SPELLED["mixup_only"]
            if "toe_r1" not in given:
                allowed |= NOT_SPELLED["toe_only"]
            if _flag(cmd, "--opt") == "sgd":
                allowed.add("opt_eps")
            if "--no-repeated-aug" in cmd:
                allowed.add("ra_reps")
            if "--no-model-ema" in cmd:
                allowed.add("model_ema_decay")
            if _flag(cmd, "--curriculum") == "none":
                allowed.add("curriculum_downsample")
            assert dests - given - allowed == set(), (script, _flag(cmd, "--output_dir"))


def test_only_filter():
    cmds = _dry_commands("table7_ablation", ONLY="deit_small_.*seed")
    assert [c[-1].rsplit("/", 1)[1] for c in cmds] == [f"deit_small_random_noexpand_seed{i}" for i in range(3)]


def _write_complete_log(run: Path, epochs: int, notice_at: Optional[int] = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "test_acc1": 1.0} for e in range(epochs if notice_at is None else notice_at)]
    if notice_at is not None:
        rows.append({"resumed_with_changes": {"toe_r1": [0.5, 0.4]}, "epoch": notice_at})
    (run / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_finished_runs_are_skipped_on_every_node(tmp_path):
    """Skipping reads the shared OUT: node 1 of 2 skips the runs node 0 would skip, and launches the others
    (here: TORCHRUN=echo). A notice row for the last epoch is not the last epoch's metrics."""
    out, data = tmp_path / "out", tmp_path / "imagenet"
    data.mkdir()
    for name in ("table2/deit_tiny_toe_r1_0.5", "table8/deit_tiny_layer0", "table8/deit_tiny_layer2"):
        _write_complete_log(out / name, 300)
    _write_complete_log(out / "table8/deit_tiny_layer3", 300, notice_at=299)
    for rank in ("0", "1"):
        res = _bash("table8_layer", OUT=str(out), DATA=str(data), NGPUS="8", NNODES="2", NODE_RANK=rank,
                    MASTER_ADDR="10.0.0.1", TORCHRUN="echo")
        assert res.returncode == 0, res.stderr
        assert res.stdout.count(": complete (300 epochs in ") == 3
        launched = [line for line in res.stdout.splitlines() if line.startswith("--nproc_per_node")]
        assert len(launched) == 1 and f"--node_rank {rank} " in launched[0] and "deit_tiny_layer3" in launched[0]


def _path_without_python(folder: Path) -> str:
    """A PATH of one folder holding a link to every program of this PATH except python*: the scripts find
    bash, coreutils, awk, ... but no python, as with a virtual environment used without activating it."""
    folder.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name.startswith("python") or os.path.lexists(link) or not os.access(entry.path, os.X_OK):
                continue
            link.symlink_to(entry.path)
    assert not any(shutil.which(name, path=str(folder)) for name in ("python", "python3"))
    return str(folder)


def test_scripts_run_python_from_PYTHON_not_PATH(tmp_path):
    """With no python on PATH, a script that runs python (common.sh's check for a finished run) works
    through PYTHON: every run of Table 8 is found complete and skipped (without python each would launch)."""
    out = tmp_path / "out"
    runs = ("table2/deit_tiny_toe_r1_0.5", "table8/deit_tiny_layer0", "table8/deit_tiny_layer2",
            "table8/deit_tiny_layer3")
    for name in runs:
        _write_complete_log(out / name, 300)
    res = _bash("table8_layer", OUT=str(out), DATA=str(tmp_path), TORCHRUN="echo",
                PATH=_path_without_python(tmp_path / "bin"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(": complete (300 epochs in ") == len(runs) and "--nproc_per_node" not in res.stdout


def test_quickstart_rejects_bad_epochs():
    res = _bash("quickstart", timeout=60, EPOCHS="0")
    assert (res.returncode, res.stdout, res.stderr) == (2, "", "error: EPOCHS must be a positive integer, got '0'\n")


def test_quickstart_dry_run_prints_its_three_commands(tmp_path):
    """Both training runs (main.py's parser takes their flags; they differ only in ToE and the output folder)
    and the report, all with the interpreter PYTHON names."""
    import main

    res = _bash("quickstart", timeout=60, DRY_RUN="1", OUT=str(tmp_path / "qs"), EPOCHS="2")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    base, toe, report = [shlex.split(line) for line in res.stdout.splitlines()]
    assert base[:2] == toe[:2] == [sys.executable, "main.py"]
    assert report == [sys.executable, "scripts/quickstart_report.py", str(tmp_path / "qs")]
    b, t = (vars(main.get_args_parser().parse_args(cmd[2:])) for cmd in (base, toe))
    assert {k for k in b if b[k] != t[k]} == {"toe_r1", "toe_epochs", "output_dir"}
    assert (b["epochs"], t["toe_epochs"], t["toe_r1"], t["toe_ng"], t["toe_k"]) == (2, 3, 0.5, 3, 2)
    assert "--toe-ng" in toe and "--toe-k" in toe
    assert not (tmp_path / "qs").exists()


@pytest.mark.slow
def test_quickstart_one_epoch(tmp_path):
    """EPOCHS=1 (< ng = 3 stages) runs: ToE's stages span 3 epochs, so epoch 0 keeps r1 = 50% of the tokens.
    No python on PATH: every step runs the interpreter PYTHON names. The report's table holds each run's
    step time; the ratios printed under it are those of the step times and of log.txt's GFLOPs."""
    res = _bash("quickstart", timeout=600, EPOCHS="1", FAKE_SIZE="32", BATCH="16", DEVICE="cpu",
                OUT=str(tmp_path), QS_DATA="fake", OMP_NUM_THREADS="1", PATH=_path_without_python(tmp_path / "bin"))
    assert res.returncode == 0, res.stderr[-3000:]
    from runtime import runlog

    rows = {name: runlog.epoch_rows(str(tmp_path / name / "log.txt")) for name in ("baseline", "toe")}
    assert [(r["epoch"], r["toe_tokens"], r["num_patches"]) for r in rows["toe"]] == [(0, 32, 64)]
    assert json.loads((tmp_path / "toe" / "args.json").read_text())["toe_epochs"] == 3
    lines = res.stdout.splitlines()
    table = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["baseline"], ["ToE"])}
    step_ms = {name: float(table[name][5]) for name in ("baseline", "ToE")}
    assert lines[-3].startswith("step ms: median of 7 training steps after warm-up, CPU time (1 thread)")
    ratios = re.fullmatch(r"ToE/baseline: (\d+\.\d\d)x faster training step, (\d+\.\d\d)x fewer GFLOPs", lines[-2])
    assert ratios, lines[-2]
    assert float(ratios.group(1)) == pytest.approx(step_ms["baseline"] / step_ms["ToE"], abs=0.01)
    gflops = rows["baseline"][0]["gflops_per_iter"] / rows["toe"][0]["gflops_per_iter"]
    assert float(ratios.group(2)) == pytest.approx(gflops, abs=0.005)
    assert "summarize.py" in lines[-1]


# ============================================================================================== SMOKE
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every script with SMOKE=1, queued (SMOKE_DEFER) and run in one python process; ``argv``: the main.py
    arguments each script printed for each run folder."""
    base = tmp_path_factory.mktemp("smoke")
    out, queue = base / "out", base / "queue"
    argv: Dict[str, List[str]] = {}
    for script in TABLES:
        res = _bash(script, SMOKE="1", SMOKE_DEFER=str(queue), OUT=str(out))
        assert res.returncode == 0, f"{script}: {res.stderr}"
        for line in res.stdout.splitlines():
            if line.startswith("[smoke] table") and " python main.py " in line:
                cmd = shlex.split(line.split(": ", 1)[1])
                argv[cmd[cmd.index("--output_dir") + 1]] = cmd[2:]
    flush = subprocess.run(["bash", "-c", "source scripts/common.sh && smoke_flush now"], cwd=ROOT,
                           env=_env(SMOKE="1", SMOKE_DEFER=str(queue), OUT=str(out)), text=True,
                           capture_output=True, timeout=900)
    return {"out": out, "flush": flush, "base": base, "argv": argv}


def _log(run: Path) -> List[dict]:
    from runtime import runlog

    return runlog.epoch_rows(str(run / "log.txt"))


def _expected_tokens(args: Dict[str, object], epoch: int, num_patches: int) -> int:
    """Patch tokens ToE keeps at ``epoch``: toe.Schedule for the paper's equations; the official code's
    int(r0 M) + int(M (r1 - r0)) in its first stage."""
    import toe

    if args["toe_r1"] is None:
        return num_patches
    sched = toe.Schedule(r1=args["toe_r1"], ng=args["toe_ng"], k=args["toe_k"], r0=args["toe_r0"],
                         epochs=args["toe_epochs"])
    if args["toe_compat"] == "official":
        assert sched.stage(epoch) == 1
        r0, r1 = sched.r0, sched.r1
        return int(r0 * num_patches) + int(num_patches * (r1 - r0))
    return sched.num_tokens(epoch, num_patches)


def test_smoke_runs_every_command_of_every_script(smoke):
    flush = smoke["flush"]
    assert flush.returncode == 0, flush.stdout[-3000:] + flush.stderr[-3000:]
    out = smoke["out"]
    # the runs SMOKE made are exactly the runs DRY_RUN lists
    expected = set()
    for script in TABLES:
        res = _bash(script, DRY_RUN="1", DATA="/d", OUT=str(out), TOKEN_LABEL_DATA="/l")
        expected |= {_flag(shlex.split(line), "--output_dir") for line in res.stdout.splitlines()
                     if line.startswith("torchrun ")}
    made = {str(p.parent) for p in out.rglob("log.txt")}
    assert made == expected == set(smoke["argv"])
    assert flush.stdout.count(": exit 0 in ") == len(made) + 1  # + the token-label generation
    summarize = _summarize_module()
    for run in sorted(made):
        rows = _log(Path(run))
        args = json.loads((Path(run) / "args.json").read_text())
        # main.py ran with the flags the script passed (args.json reads them back)
        passed = _parse_flags(smoke["argv"][run])
        assert {k: v for k, v in passed.items() if not summarize._same(args[k], v)} == {}, run
        # one epoch each (a curriculum: one per phase), 8x8 patches, and ToE kept the tokens its schedule says
        epochs = 5 if args["curriculum"] != "none" else 1
        assert [r["epoch"] for r in rows] == list(range(epochs)) and rows[0]["num_patches"] == 64, run
        # the tokens of the epoch's training size (a curriculum trains smaller; patch 4 in SMOKE)
        patches = (rows[0]["train_input_size"] // 4) ** 2
        assert rows[0]["toe_tokens"] == _expected_tokens(args, 0, patches), run
    r = _log(out / "table2" / "deit_tiny_toe_r1_0.5")[0]
    assert (r["toe_keep_rate"], r["toe_tokens"]) == (0.5, 32)
    # the official op (Table 3's default): int(0.2 x 64) + int(64 x (0.4 - 0.2)) = 12 + 12, not floor(0.4 x 64)
    assert _log(out / "table3" / "lvvit_s_toe_r1_0.4_official")[0]["toe_tokens"] == 24


def test_smoke_rerun_skips_complete_runs(smoke):
    res = _bash("table8_layer", SMOKE="1", OUT=str(smoke["out"]))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("complete (1 epochs") == 4 and "[smoke] table8/" not in res.stdout


def _summarize_module():
    spec = importlib.util.spec_from_file_location("toe_summarize", SCRIPTS / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse_flags(argv: List[str]) -> Dict[str, object]:
    return _summarize_module().parse_flags(argv)


def test_summarize_smoke_runs_are_your_runs(smoke, tmp_path):
    """Smoke runs (tiny model, FAKE data, 1 epoch) fit no paper table: the output says why first, and
    "Your runs" pairs each ToE run with its baseline; toe.flops's count of a baseline equals what main.py
    logged."""
    out = smoke["out"]
    md, js = tmp_path / "tables.md", tmp_path / "cells.json"
    res = subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), str(out), "--markdown", str(md),
                          "--json", str(js)], cwd=ROOT, text=True, capture_output=True, timeout=600,
                         env=_env(OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    n = len(smoke["argv"])
    assert lines[0] == f'{n} run(s) fit no paper table (they are in "Your runs" below); how they differ from ' \
                       "the table scripts' commands:"
    assert "    --input-size 32, not 224" in lines and "    --epochs 1, not 300" in lines
    tables = {t["table"]: t for t in json.loads(js.read_text())["tables"]}
    assert all(not c["runs"] for t, table in tables.items() if t != "yours" for c in table["cells"].values())
    yours = tables["yours"]["cells"]
    assert len(yours) == n and "### Your runs" in md.read_text()

    def cell(run: str) -> dict:
        return yours[run]

    for toe_run, base_run in (("table2/deit_tiny_toe_r1_0.5", "table2/deit_tiny_baseline"),
                              ("table3/lvvit_m_toe_r1_0.4_official", "table3/lvvit_m_baseline"),
                              ("table5/deit_small_cifar10_pre_toe_ft_toe_r1_0.5",
                               "table5/deit_small_cifar10_pre_toe_ft_baseline")):
        assert cell(toe_run)["baseline"] == [str(out / base_run)], toe_run
        assert cell(toe_run)["gflops_source"] == cell(base_run)["gflops_source"] == "toe.flops"
        assert cell(toe_run)["gflops"] < cell(base_run)["gflops"]
        assert math.isclose(cell(base_run)["gflops"], _log(out / base_run)[0]["gflops_per_iter"], rel_tol=1e-6)
        assert math.isclose(cell(toe_run)["top1"], max(r["test_acc1"] for r in _log(out / toe_run)))
        assert math.isclose(cell(base_run)["gpu_hours"], sum(r["epoch_time"] for r in _log(out / base_run)) / 3600)
    # seeds 1 and 2 of Table 7 have no baseline with their seed
    assert cell("table7/deit_tiny_random_noexpand_seed1")["baseline"] == []
