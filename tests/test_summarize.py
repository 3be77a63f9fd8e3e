"""scripts/summarize.py (the report/ package) on synthetic run folders (args.json + log.txt written here, no
training).

The runs are the table scripts' own DRY_RUN commands, parsed with main.py's parser, with the values main.py
adds to args.json (lr_scaled, global_batch) and made-up epoch rows; so each test knows exactly which cell a
run must fill, and that a run with one flag changed must not.
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
from typing import Any, Dict, List, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The brief of issue 9 §6: a new user's 10-class image folder at 32 px with a 6-block DeiT-tiny.
USER_RUN = ["--model", "deit_tiny_patch16_224", "--data-set", "FOLDER", "--data-path", "/data/pets",
            "--input-size", "32", "--model-kwargs", "depth=6", "--patch-size", "4", "--epochs", "3",
            "--batch-size", "32", "--unscale-lr", "--lr", "1e-3"]


def _summarize():
    spec = importlib.util.spec_from_file_location("toe_summarize_t", SCRIPTS / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def summarize():
    return _summarize()


def dry_commands(script: str, **env: str) -> List[Dict[str, Any]]:
    """DRY_RUN=1 output of scripts/<script>.sh -> [{'world', 'argv'}] per command."""
    full = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "DRY_RUN": "1", "DATA": "/data/in", "OUT": "/runs",
            **env}
    res = subprocess.run(["bash", str(SCRIPTS / f"{script}.sh")], cwd=ROOT, env=full, text=True,
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = []
    for line in res.stdout.splitlines():
        if line.startswith("torchrun "):
            tokens = shlex.split(line)
            launch = dict(zip(tokens[1:tokens.index("main.py"):2], tokens[2:tokens.index("main.py"):2]))
            out.append({"world": int(launch["--nproc_per_node"]) * int(launch["--nnodes"]),
                        "argv": tokens[tokens.index("main.py") + 1:]})
    return out


def args_json(argv: Sequence[str], world: int) -> Dict[str, Any]:
    """What main.py writes to args.json for ``argv`` on ``world`` processes: its parsed flags plus the
    global batch and the lr it trains with."""
    import main

    args = vars(main.get_args_parser().parse_args(list(argv)))
    batch = args["batch_size"] * world * args["grad_accum_steps"]
    args.update(global_batch=batch, lr_scaled=args["lr"] if args["unscale_lr"] else args["lr"] * batch / 512,
                eval_crop_ratio=args["eval_crop_ratio"] or 0.875)  # resolved: DeiT's crop_pct
    return json.loads(json.dumps(args, default=str))


def write_run(folder: Path, args: Dict[str, Any], top1: Sequence[float], epoch_time: float = 36.0,
              gflops: float = 100.0, extra_lines: Sequence[str] = ()) -> Path:
    """A run folder: args.json and one log row per epoch (test_acc1 = top1[e], ema 1 below)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(args))
    rows = [json.dumps({"epoch": e, "test_acc1": a, "ema_test_acc1": a - 1, "epoch_time": epoch_time,
                        "gflops_per_iter": gflops}) for e, a in enumerate(top1)]
    (folder / "log.txt").write_text("\n".join(rows + list(extra_lines)) + "\n")
    return folder


def argv_of(commands: List[Dict[str, Any]], run: str) -> Dict[str, Any]:
    """The command whose --output_dir ends with ``run`` (e.g. 'table2/deit_tiny_baseline')."""
    hits = [c for c in commands if c["argv"][c["argv"].index("--output_dir") + 1].endswith("/" + run)]
    assert len(hits) == 1, run
    return hits[0]


def script_run(root: Path, commands: List[Dict[str, Any]], run: str, top1: Sequence[float], **kw: Any) -> Path:
    """The synthetic run of a script command, written to root/<run>, trained for every epoch."""
    cmd = argv_of(commands, run)
    args = args_json(cmd["argv"], cmd["world"])
    args["output_dir"] = str(root / run)
    if args["finetune"]:  # Table 5: the pre-training run of the same root
        args["finetune"] = str(root / os.path.relpath(args["finetune"], "/runs"))
    epochs = args["epochs"]
    curve = list(top1) + [top1[-1]] * (epochs - len(top1))
    return write_run(root / run, args, curve, **kw)


def run_cli(summarize, argv: Sequence[str], capsys) -> Dict[str, Any]:
    rc = summarize.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return {"out": out.out, "err": out.err}


def _cells(path: Path) -> Dict[str, Dict[str, Any]]:
    return {t["table"]: t["cells"] for t in json.loads(path.read_text())["tables"]}


def _line(text: str, *needles: str) -> str:
    hits = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert len(hits) == 1, (needles, hits)
    return hits[0]


# ==================================================================================== reading commands
@pytest.mark.parametrize("script,env", [("table2_deit", {}), ("table2_deit", {"TOE_COMPAT": "official"}),
                                        ("table3_lvvit", {"TOE_COMPAT": "official"}), ("table5_cifar", {}),
                                        ("table6_hparams", {}), ("table7_ablation", {}), ("table9_distance", {})])
def test_parse_flags_reads_commands_as_main_does(summarize, script, env):
    import main

    parser = main.get_args_parser()
    for cmd in dry_commands(script, **env):
        mine = summarize.parse_flags(cmd["argv"])
        theirs = vars(parser.parse_args(cmd["argv"]))
        assert {k: theirs[k] for k in mine} == mine


def test_parse_flags_bare_and_multi_value(summarize):
    got = summarize.parse_flags(["--no-model-ema", "--toe-no-expand", "--toe-stage-epochs", "0", "100", "200",
                                 "--model-kwargs", "depth=6", "stem=conv", "--lr", "1e-3", "--lr", "2e-3"])
    assert got == {"model_ema": False, "toe_no_expand": True, "toe_stage_epochs": [0, 100, 200],
                   "model_kwargs": {"depth": 6, "stem": "conv"}, "lr": 2e-3}
    with pytest.raises(ValueError, match="expected a --flag"):
        summarize.parse_flags(["lr", "1"])


# ============================================================================= filling the paper tables
@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory):
    """Synthetic runs of every command of Tables 2, 5, 8 and 9 (both --toe-compat variants), top-1 rising
    by 0.5 per run so that each cell's number names its run."""
    root = tmp_path_factory.mktemp("paper")
    t2 = dry_commands("table2_deit") + dry_commands("table2_deit", TOE_COMPAT="none")[-1:]  # official by default
    commands = {"2": t2, "5": dry_commands("table5_cifar"), "8": dry_commands("table8_layer"),
                "9": dry_commands("table9_distance")}
    acc: Dict[str, float] = {}
    for cmds in commands.values():
        for cmd in cmds:
            run = os.path.relpath(cmd["argv"][cmd["argv"].index("--output_dir") + 1], "/runs")
            if run in acc or not (run.startswith(("table2/", "table5/", "table8/", "table9/"))):
                continue
            acc[run] = 60.0 + 0.5 * len(acc)
            script_run(root, cmds, run, [acc[run] - 10, acc[run]], epoch_time=36.0 + len(acc))
    return {"root": root, "acc": acc}


def test_every_script_command_fills_its_cell(summarize, paper_runs, tmp_path, capsys):
    root, acc = paper_runs["root"], paper_runs["acc"]
    js = tmp_path / "cells.json"
    res = run_cli(summarize, [root, "--tables", "2,5,8,9", "--no-flops", "--json", js], capsys)
    assert res["out"].splitlines()[0] == f"{len(acc)} run(s) under {root}"  # nothing left out
    assert "Your runs" not in res["out"]
    cells = _cells(js)
    for table, label, run in (("2", "DeiT-tiny Baseline", "table2/deit_tiny_baseline"),
                              ("2", "DeiT-base ToE r1=0.5", "table2/deit_base_toe_r1_0.5"),
                              ("8", "Third block (layer 3)", "table8/deit_tiny_layer3"),
                              ("8", "First block (layer 1)", "table2/deit_tiny_toe_r1_0.5"),
                              ("5", "DeiT-small pre ToE r1=0.5 / ft Baseline cifar100",
                               "table5/deit_small_cifar100_pre_toe_ft_baseline"),
                              ("9", "Manhattan distance [exact] DeiT-small", "table9/deit_small_manhattan"),
                              ("9", "Cosine distance [exact] DeiT-tiny", "table2/deit_tiny_toe_r1_0.5"),
                              ("9", "Cosine distance [official code] DeiT-tiny", "table9/deit_tiny_cosine_official")):
        assert cells[table][label]["runs"] == [str(root / run)], label
        assert math.isclose(cells[table][label]["top1"], acc[run])
    assert all(len(c["runs"]) == 1 for t in ("5", "8", "9") for c in cells[t].values())
    # Table 2's DeiT-base r1=0.4 has runs of both variants: two rows, the paper's numbers on the official one
    assert cells["2"]["DeiT-base ToE r1=0.4"]["runs"] == [str(root / "table2/deit_base_toe_r1_0.4")]
    assert cells["2"]["DeiT-base ToE r1=0.4 [official code]"]["runs"] == \
        [str(root / "table2/deit_base_toe_r1_0.4_official")]
    rows = [line for line in res["out"].splitlines() if line.startswith("DeiT-base") and "ToE r1=0.4" in line]
    exact = [line for line in rows if "[official code]" not in line]
    assert len(rows) == 2 and len(exact) == 1
    assert "81.4" not in exact[0] and "81.4 (-0.4)" in _line(res["out"], "DeiT-base", "ToE r1=0.4 [official code]")


def test_table9_prints_both_variants_paper_next_to_official(summarize, paper_runs, capsys):
    text = run_cli(summarize, [paper_runs["root"], "--tables", "9", "--no-flops"], capsys)["out"]
    acc = paper_runs["acc"]
    for label, dist, tiny, small in (("Manhattan distance", "manhattan", "69.8", "78.0"),
                                     ("Euclidean distance", "euclidean", "70.6", "78.4"),
                                     ("Cosine distance", "cosine", "72.6", "79.8")):
        exact = _line(text, label + " [exact]").split()
        official = _line(text, label + " [official code]").split()
        assert tiny not in exact and small not in exact and exact[-1] == "1+1"
        assert official[-5:] == [f"{acc[f'table9/deit_tiny_{dist}_official']:.2f}", tiny,
                                 f"{acc[f'table9/deit_small_{dist}_official']:.2f}", small, "1+1"]


def test_a_changed_recipe_flag_keeps_a_run_out(summarize, tmp_path, capsys):
    t2, t5 = dry_commands("table2_deit"), dry_commands("table5_cifar")
    ok = script_run(tmp_path, t2, "table2/deit_tiny_baseline", [70.0])
    cmd = argv_of(t2, "table2/deit_tiny_toe_r1_0.5")
    bad = args_json(cmd["argv"] + ["--reprob", "0"], cmd["world"])
    write_run(tmp_path / "mine" / "toe_no_erasing", bad, [71.0] * 300)
    cmd = argv_of(t5, "table5/deit_tiny_cifar10_pre_baseline_ft_baseline")  # DeiT's ImageNet erasing
    erasing = args_json(cmd["argv"] + ["--reprob", "0.25", "--drop-path", "0.1"], cmd["world"])
    erasing["finetune"] = str(ok / "checkpoint.pth")
    write_run(tmp_path / "mine" / "cifar_erasing", erasing, [98.0] * 1000)
    js = tmp_path / "cells.json"
    text = run_cli(summarize, [tmp_path, "--tables", "2,5", "--no-flops", "--json", js], capsys)["out"]
    lines = text.splitlines()
    assert lines[0].startswith("2 run(s) fit no paper table")
    assert lines[1:7] == ["  mine/cifar_erasing (closest: Table 5, scripts/table5_cifar.sh):",
                          "    --drop-path 0.1, not 0", "    --reprob 0.25, not 0",
                          "  mine/toe_no_erasing (closest: Table 2, scripts/table2_deit.sh):",
                          "    --reprob 0, not 0.25", ""]
    cells = _cells(js)
    assert cells["2"]["DeiT-tiny Baseline"]["runs"] == [str(ok)]
    assert cells["2"]["DeiT-tiny ToE r1=0.5"]["runs"] == [] and not any(c["runs"] for c in cells["5"].values())
    # both are in "Your runs"; the ToE run has no baseline with its arguments
    assert set(cells["yours"]) == {"mine/toe_no_erasing", "mine/cifar_erasing"}
    assert cells["yours"]["mine/toe_no_erasing"]["baseline"] == []


def test_lr_as_trained_and_older_args_json(summarize, tmp_path, capsys):
    t5 = dry_commands("table5_cifar", CIFAR_LR="0.02")
    cmd = argv_of(t5, "table5/deit_tiny_cifar100_pre_baseline_ft_baseline")
    lr002 = dict(args_json(cmd["argv"], cmd["world"]), finetune=str(tmp_path / "old" / "checkpoint.pth"))
    write_run(tmp_path / "lr002", lr002, [80.0] * 1000)
    t2 = dry_commands("table2_deit")
    cmd = argv_of(t2, "table2/deit_small_baseline")
    old = args_json(cmd["argv"], cmd["world"])
    old["lr"] = old.pop("lr_scaled")  # main.py before the split wrote the scaled lr into "lr" ...
    del old["global_batch"], old["toe_compat"], old["curriculum"]  # ... and knew none of these
    old["world_size"] = cmd["world"]
    write_run(tmp_path / "old", old, [79.0] * 300)
    js = tmp_path / "cells.json"
    text = run_cli(summarize, [tmp_path, "--tables", "2,5", "--no-flops", "--json", js], capsys)["out"]
    assert text.splitlines()[1:4] == ["  lr002 (closest: Table 5, scripts/table5_cifar.sh):",
                                      "    lr as trained 0.02, not 0.01", ""]
    assert _cells(js)["2"]["DeiT-small Baseline"]["runs"] == [str(tmp_path / "old")]


# ================================================================================ a new user's own runs
def test_unlike_runs_are_left_out_and_compared_in_your_runs(summarize, tmp_path, capsys):
    base = write_run(tmp_path / "pets" / "baseline", args_json(USER_RUN + ["--output_dir", "x"], 1),
                     [40.0, 50.0, 48.0], epoch_time=900.0, gflops=8.0)
    toe_args = USER_RUN + ["--toe-r1", "0.5", "--output_dir", "y"]
    toe_run = write_run(tmp_path / "pets" / "toe", args_json(toe_args, 1), [41.0, 52.5, 51.0],
                        epoch_time=600.0, gflops=5.0)
    other = write_run(tmp_path / "pets" / "toe_seed1", args_json(toe_args + ["--seed", "1"], 1), [30.0],
                      epoch_time=600.0, gflops=5.0)
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    res = run_cli(summarize, [tmp_path / "pets", "--no-flops", "--markdown", md, "--json", js], capsys)
    lines = res["out"].splitlines()
    assert lines[0].startswith("3 run(s) fit no paper table")
    assert lines[1] == "  baseline (closest: Table 2, scripts/table2_deit.sh):"
    reasons = lines[2:lines.index("  toe, toe_seed1 (closest: Table 2, scripts/table2_deit.sh):")]
    for needle in ("    --data-set FOLDER, not IMNET", "    --input-size 32, not 224", "    --epochs 3, not 300",
                   "    model kwargs depth=6 patch_size=4, not none", "    global batch 32, not 1024"):
        assert needle in reasons
    cells = _cells(js)
    assert all(not c["runs"] for t in ("2", "6", "7", "8", "9") for c in cells[t].values())
    yours = cells["yours"]
    assert yours["toe"]["baseline"] == [str(base)] and yours["toe_seed1"]["baseline"] == []
    row = _line(res["out"], "toe  ", "ToE r1=0.5")
    # best 52.50 vs 50.00, final 51.00 vs 48.00; GFLOPs 5 vs 8 (1.60x); 1800 s vs 2700 s of 1 GPU (1.50x)
    for text in ("52.50 (+2.50)", "51.00 (+3.00)", "5.00e0 [log]", "1.60x", "1.50x"):
        assert text in row, (text, row)
    assert " *" not in row and "30.00 *" in _line(res["out"], "toe_seed1  ")  # 1 of 3 epochs logged
    assert "### Your runs (they fit no paper table)" in md.read_text()
    assert math.isclose(yours["toe"]["top1"], 52.5) and math.isclose(yours["toe"]["final_top1"], 51.0)
    assert yours["toe"]["gflops_source"] == "log" and yours["toe"]["runs"] == [str(toe_run)]
    assert yours["toe_seed1"]["runs"] == [str(other)]


def _tiny_vit(extra: Sequence[str] = ()) -> List[str]:
    return ["--model", "deit_tiny_patch16_224", "--data-set", "FAKE", "--nb-classes", "10", "--input-size", "32",
            "--patch-size", "4", "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2", "--epochs", "6",
            "--batch-size", "16", "--output_dir", "o", *extra]


def test_gflops_come_from_toe_flops_and_say_so(summarize, tmp_path, capsys):
    import toe
    from toe import flops

    from training import builders

    write_run(tmp_path / "vit_base", args_json(_tiny_vit(), 2), [10.0] * 6, gflops=999.0)
    write_run(tmp_path / "vit_toe", args_json(_tiny_vit(["--toe-r1", "0.5", "--toe-ng", "3"]), 2), [11.0] * 6,
              gflops=999.0)
    js = tmp_path / "t.json"
    res = run_cli(summarize, [tmp_path, "--tables", "2", "--json", js], capsys)
    yours = _cells(js)["yours"]
    model = builders.create_model("deit_tiny_patch16_224", 10, 32,
                                  {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 4})
    want_base = flops.gflops_per_iteration(model, None, batch_size=32, img_size=32)["gflops"]
    want_toe = flops.gflops_per_iteration(model, toe.Schedule(r1=0.5, ng=3, k=2, epochs=6), batch_size=32,
                                          img_size=32)["gflops"]
    assert yours["vit_base"]["gflops_source"] == yours["vit_toe"]["gflops_source"] == "toe.flops"
    assert math.isclose(yours["vit_base"]["gflops"], want_base) and math.isclose(yours["vit_toe"]["gflops"], want_toe)
    assert "[log]" not in res["out"] and res["err"] == ""
    assert f"{want_base / want_toe:.2f}x" in _line(res["out"], "vit_toe ", "ToE")


def test_gflops_fall_back_to_the_log_only_for_uncountable_models(summarize, tmp_path, capsys, monkeypatch):
    cnn = args_json(["--model", "resnet10t", "--data-set", "FAKE", "--input-size", "32", "--epochs", "2",
                     "--batch-size", "8", "--output_dir", "o"], 1)
    write_run(tmp_path / "cnn", cnn, [5.0, 6.0], gflops=1.25)
    js = tmp_path / "t.json"
    res = run_cli(summarize, [tmp_path, "--tables", "2", "--json", js], capsys)
    cell = _cells(js)["yours"]["cnn"]
    assert cell["gflops_source"] == "log" and math.isclose(cell["gflops"], 1.25)
    assert "1.25e0 [log]" in _line(res["out"], "cnn  ")
    assert "ToE cannot patch ResNet" in res["err"] and res["err"].count("\n") == 1
    # a failure of toe.flops itself is not hidden behind the logged number
    from toe import flops

    def broken(*a, **k):
        raise RuntimeError("toe.flops bug")

    from report import runs

    monkeypatch.setattr(flops, "gflops_per_iteration", broken)
    monkeypatch.setattr(runs, "_FLOPS_CACHE", {})  # no count from an earlier test stands in
    write_run(tmp_path / "vit", args_json(_tiny_vit(), 1), [1.0] * 6)
    with pytest.raises(RuntimeError, match="toe.flops bug"):
        summarize.main([str(tmp_path / "vit"), "--tables", "2"])


def test_notice_rows_and_torn_lines_are_not_epochs(summarize, tmp_path, capsys):
    notice = json.dumps({"resumed_with_changes": {"toe_r1": [0.5, 0.4]}, "epoch": 2})
    write_run(tmp_path / "r", args_json(_tiny_vit(), 1), [10.0, 20.0], extra_lines=[notice, '{"epoch": 5, "test_'])
    js = tmp_path / "t.json"
    run_cli(summarize, [tmp_path, "--tables", "8", "--no-flops", "--json", js], capsys)
    run = json.loads(js.read_text())["runs"][0]
    assert (run["epochs_done"], run["complete"], run["top1"], run["final_top1"]) == (2, False, 20.0, 20.0)


def test_plots_cover_paper_models_and_your_runs(summarize, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    t2 = dry_commands("table2_deit")
    script_run(tmp_path, t2, "table2/deit_tiny_baseline", [70.0])
    script_run(tmp_path, t2, "table2/deit_tiny_toe_r1_0.5", [70.5])
    write_run(tmp_path / "mine" / "b", args_json(_tiny_vit(), 1), [10.0, 12.0], epoch_time=10.0)
    write_run(tmp_path / "mine" / "t", args_json(_tiny_vit(["--toe-r1", "0.5"]), 1), [11.0, 12.5], epoch_time=8.0)
    plots = tmp_path / "plots"
    run_cli(summarize, [tmp_path, "--tables", "2", "--no-flops", "--plots", plots], capsys)
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["fig3_deit_tiny_patch16_224.png", "fig3_yours1_deit_tiny_patch16_224.png",
                     "fig4_deit_tiny_patch16_224.png", "fig4_yours1_deit_tiny_patch16_224.png"]
    for p in plots.iterdir():
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_without_matplotlib(summarize, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    write_run(tmp_path / "r", args_json(_tiny_vit(), 1), [10.0])
    plots = tmp_path / "plots"
    res = run_cli(summarize, [tmp_path, "--tables", "8", "--no-flops", "--plots", plots], capsys)
    assert "Table 8." in res["out"]
    assert res["err"].strip().splitlines() == [
        "summarize.py: matplotlib is not installed, so no plots were drawn (pip install matplotlib)"]
    assert not plots.exists()


def test_bad_input(tmp_path):
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), *argv], cwd=ROOT, text=True,
                              capture_output=True, timeout=120)

    for argv, needle in (([str(tmp_path / "missing")], "no such file or directory"),
                         ([str(tmp_path)], "no log.txt under"),
                         ([str(tmp_path), "--tables", "1"], "unknown table 1"),
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


def test_table4_runs_fill_their_cells_next_to_the_paper(summarize, tmp_path, capsys):
    """Table 4 (EfficientTrain + ToE): the script's six commands fill the six cells, each with its own run."""
    commands = dry_commands("table4_efficienttrain")
    acc: Dict[str, float] = {}
    for cmd in commands:
        run = os.path.relpath(cmd["argv"][cmd["argv"].index("--output_dir") + 1], "/runs")
        acc[run] = 70.0 + 0.5 * len(acc)
        script_run(tmp_path, commands, run, [acc[run] - 5, acc[run]])
    assert len(acc) == 6
    js = tmp_path / "cells.json"
    res = run_cli(summarize, [tmp_path, "--tables", "4", "--no-flops", "--json", js], capsys)
    assert "Your runs" not in res["out"]
    cells = _cells(js)["4"]
    filled = {run for cell in cells.values() for run in cell["runs"]}
    assert filled == {str(tmp_path / run) for run in acc}
    for cell in cells.values():
        (run,) = cell["runs"]
        assert math.isclose(cell["top1"], acc[os.path.relpath(run, tmp_path)])
    # the paper's printed top-1 stands in the row of the EfficientTrain + ToE DeiT-tiny run
    assert "73.5 (+1.0)" in _line(res["out"], "DeiT-tiny   EfficientTrain + ToE r1=0.6")

