"""scripts/summarize.py keeps out of the paper tables every run that trained or measured otherwise: each flag
of main.py is compared unless it cannot change a reported number, and runs resumed under changed flags are
mixtures; "Your runs" and the plots show what tells runs apart. Synthetic runs, as in test_summarize.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_summarize import (ROOT, SCRIPTS, _cells, _line, _tiny_vit, args_json, argv_of, dry_commands,  # noqa: F401
                            run_cli, script_run, summarize, write_run)


# Flags of main.py that cannot change a reported number (top-1, GFLOPs per iteration, GPU hours), each with the
# reason; a run that changes any other flag of main.py must leave the paper tables.
CANNOT_CHANGE_A_NUMBER = {
    "output_dir": "where the run writes",
    "data_path": "where the data set lies; which data set it is, --data-set, is compared",
    "token_label_data": "where the label maps lie",
    "device": "which GPU of the machine",
    "world_size": "a check against the launcher; the number of processes counts through the global batch",
    "dist_url": "how the processes meet",
    "local_rank": "set per process by the launcher",
    "num_workers": "loader processes: the same batches",
    "pin_mem": "page-locked host copies: the same batches",
    "prefetch_factor": "batches prepared ahead: the same batches",
    "persistent_workers": "only which random draws a resumed run makes, as a seed does",
    "dist_eval": "exact: every validation image once, no padding",
    "seed": "a replicate: several seeds fill one cell as mean and std",
    "resume": "which checkpoint a run continues from (a resume under changed flags: log.txt's notice)",
    "resume_changed_ok": "allows that resume; the changes themselves come from log.txt's notice",
    "overwrite": "moves an old run aside before starting fresh",
    "eval": "evaluates and exits: such a run trains nothing and logs no epoch",
    "throughput": "measures speed and exits: no epoch either",
    "print_freq": "how often progress is printed",
    "skip_bad_images": "a run without it stops at a bad image instead of finishing",
}
# Flags that act only in some configurations, tested in one where they act: (script, env, run).
WHERE_IT_ACTS = {"toe_dense_loss": ("table3_lvvit", {"TOE_COMPAT": "official"}, "table3/lvvit_t_toe_r1_0.4_official")}
DEFAULT_RUN = ("table2_deit", {}, "table2/deit_tiny_toe_r1_0.5")


def _other_value(action, current):
    """Command-line words that give ``action``'s flag a value other than ``current``."""
    if action.choices:
        return [str(next(c for c in action.choices if c != current))]
    if action.nargs in ("+", "*"):
        return ["0.3", "0.7"] if action.type is float else ["3", "7"]
    if action.type is int:
        return [str((current or 0) + 1)]
    if action.type is float:
        return [str(current * 0.5 if current else 0.5)]
    return [f"{current}x" if current else "other"]


def _changed_argv(parser, argv, dest, current):
    """``argv`` with the flag of ``dest`` removed and then given another value."""
    import argparse

    actions = [a for a in parser._actions if a.dest == dest]
    options = {o for a in actions for o in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        else:
            out.append(argv[i])
            i += 1
    booleans = [a for a in actions if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
    if booleans:
        setting = [a for a in booleans if a.const is (not current)]
        return out + ([setting[0].option_strings[0]] if setting else [])  # a lone store_true: dropped is off
    action = actions[0]
    if action.dest in ("model_kwargs", "teacher_model_kwargs"):
        return out + [action.option_strings[0], "depth=6"]
    return out + [action.option_strings[0]] + _other_value(action, current)


def test_every_flag_is_compared_unless_it_cannot_change_a_number(summarize, tmp_path):
    """Flag by flag: a table run with one flag of main.py changed still fills its table only when the flag is
    in CANNOT_CHANGE_A_NUMBER; and the summarizer ignores no flag beyond that list."""
    import main
    from report import common, recipes, runs

    assert recipes.NOT_COMPARED <= set(CANNOT_CHANGE_A_NUMBER)
    parser = main.get_args_parser()
    commands = {}
    for script, env, run in [DEFAULT_RUN, *WHERE_IT_ACTS.values()]:
        cmd = argv_of(dry_commands(script, **env), run)
        commands[run] = (cmd, script)
    wrong = []
    for dest in dict.fromkeys(a.dest for a in parser._actions if a.dest != "help"):
        script, env, run = WHERE_IT_ACTS.get(dest, DEFAULT_RUN)
        cmd, _ = commands[run]
        table = run.split("/")[0][len("table"):]
        current = vars(parser.parse_args(cmd["argv"]))[dest]
        argv = _changed_argv(parser, cmd["argv"], dest, current)
        args = args_json(argv, cmd["world"])
        assert args[dest] != current or dest == "eval_crop_ratio", (dest, argv)
        placed = runs.Run(str(tmp_path / dest), [{"epoch": 0, "test_acc1": 1.0}], args)
        placed.place([table])
        if (table in placed.fits) != (dest in CANNOT_CHANGE_A_NUMBER):
            wrong.append(f"{dest}: {'fits' if table in placed.fits else 'left out'} with {argv[-3:]}")
        # the reasons name the flag as main.py spells it
        assert common.flag_name(dest) in {o for a in parser._actions if a.dest == dest for o in a.option_strings}
    assert wrong == []
    # the unchanged commands fit
    for run, (cmd, _) in commands.items():
        placed = runs.Run(str(tmp_path / "same"), [{"epoch": 0}], args_json(cmd["argv"], cmd["world"]))
        placed.place([run.split("/")[0][len("table"):]])
        assert placed.fits, run


def test_sparse_eval_runs_stay_out_of_the_paper_tables(summarize, tmp_path, capsys):
    t2 = dry_commands("table2_deit")
    cmd = argv_of(t2, "table2/deit_tiny_toe_r1_0.5")
    write_run(tmp_path / "sparse", args_json(cmd["argv"] + ["--toe-sparse-eval"], cmd["world"]), [72.0] * 300)
    js = tmp_path / "cells.json"
    out = run_cli(summarize, [tmp_path, "--tables", "2", "--no-flops", "--json", js], capsys)["out"]
    assert out.splitlines()[1:3] == ["  sparse (closest: Table 2, scripts/table2_deit.sh):",
                                     "    --toe-sparse-eval on, not off"]
    cells = _cells(js)
    assert cells["2"]["DeiT-tiny ToE r1=0.5"]["runs"] == [] and list(cells["yours"]) == ["sparse"]
    assert "sparse-eval" in _line(out, "sparse  ")


def test_runs_resumed_with_changes_are_mixtures(summarize, tmp_path, capsys):
    t2 = dry_commands("table2_deit", TOE_COMPAT="none")  # the paper's equations: the run is deit_base_toe_r1_0.4
    mixed = script_run(tmp_path, t2, "table2/deit_base_toe_r1_0.4", [80.0], extra_lines=[
        json.dumps({"resumed_with_changes": {"toe_r1": [0.5, 0.4]}, "epoch": 3})])
    # a resume that only split the same global batch differently trained the same recipe
    same = script_run(tmp_path, t2, "table2/deit_tiny_toe_r1_0.5", [72.0], extra_lines=[
        json.dumps({"resumed_with_changes": {"batch_size": [256, 128], "grad_accum_steps": [1, 2]}, "epoch": 5})])
    js = tmp_path / "cells.json"
    out = run_cli(summarize, [tmp_path, "--tables", "2", "--no-flops", "--json", js], capsys)["out"]
    assert out.splitlines()[:3] == [
        "1 run(s) fit no paper table (they are in \"Your runs\" below); how they differ from the table scripts' "
        "commands:", "  table2/deit_base_toe_r1_0.4 (closest: Table 2, scripts/table2_deit.sh):",
        "    mixed: toe_r1 0.5 -> 0.4 at epoch 3"]
    cells = _cells(js)
    assert cells["2"]["DeiT-base ToE r1=0.4"]["runs"] == []
    assert cells["2"]["DeiT-tiny ToE r1=0.5"]["runs"] == [str(same)]
    assert cells["yours"]["table2/deit_base_toe_r1_0.4"]["mixed"] == ["toe_r1 0.5 -> 0.4 at epoch 3"]
    row = _line(out, "table2/deit_base_toe_r1_0.4  ")
    assert "ToE r1=0.4 r0=0.2 ng=3 k=2 layer=1 (mixed: toe_r1 0.5 -> 0.4 at epoch 3)" in row
    (listed,) = [r for r in json.loads(js.read_text())["runs"] if r["run"] == str(mixed)]
    assert listed["fits"] == [] and listed["mixed"] == ["toe_r1 0.5 -> 0.4 at epoch 3"]


def test_your_runs_show_what_tells_them_apart(summarize, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from report import plots

    common = ["--aa", "rand-m7-mstd0.5", "--clip-grad", "1.0"]
    write_run(tmp_path / "a_base", args_json(_tiny_vit(common), 1), [10.0, 12.0])
    write_run(tmp_path / "a_toe", args_json(_tiny_vit(common + ["--toe-r1", "0.5"]), 1), [11.0, 12.5])
    write_run(tmp_path / "a_toe_official", args_json(_tiny_vit(common + ["--toe-r1", "0.5", "--toe-compat",
                                                                          "official"]), 1), [11.0, 12.0])
    write_run(tmp_path / "b_base", args_json(_tiny_vit(common + ["--reprob", "0"]), 1), [9.0, 10.0])
    lvvit = ["--model", "lvvit_t", "--token-label", "--data-set", "FAKE", "--input-size", "32", "--epochs", "2",
             "--output_dir", "o", "--toe-r1", "0.4"]
    write_run(tmp_path / "c_zero", args_json(lvvit + ["--toe-dense-loss", "zero", "--toe-compat", "official"], 1),
              [5.0, 6.0])
    drawn = []

    def finish(plt, fig, ax, title, path):
        drawn.append((os.path.basename(path), ax.get_legend_handles_labels()[1] + [a.get_text() for a in ax.texts]))
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_finish_plot", finish)
    out = run_cli(summarize, [tmp_path, "--tables", "8", "--no-flops", "--plots", tmp_path / "plots"], capsys)["out"]
    base_a, base_b = _line(out, "a_base  "), _line(out, "b_base  ")
    for row in (base_a, base_b):
        assert "--curriculum none, --aa rand-m7-mstd0.5, --clip-grad 1" in row
    assert "--reprob 0.25" in base_a and "--reprob 0" in base_b and "--reprob 0.25" not in base_b
    assert "compat=official" in _line(out, "a_toe_official  ") and "compat=" not in _line(out, "a_toe  ")
    assert "ToE r1=0.4 r0=0.2 ng=3 k=2 layer=1 compat=official dense-loss=zero" in _line(out, "c_zero  ")
    legends = dict(drawn)
    assert legends["fig3_yours1_deit_tiny_patch16_224.png"] == [
        "baseline", "ToE r1=0.5 r0=0.25 ng=3 k=2 layer=1", "ToE r1=0.5 r0=0.25 ng=3 k=2 layer=1 compat=official"]
    # Fig. 4: one point per ToE setting, named as in the Method column
    assert legends["fig4_yours1_deit_tiny_patch16_224.png"] == [
        "practical (GPU hours)", "theoretical (GFLOPs)", "ToE r1=0.5 r0=0.25 ng=3 k=2 layer=1",
        "ToE r1=0.5 r0=0.25 ng=3 k=2 layer=1 compat=official"]


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_plots_into_a_file_is_one_error_line(tmp_path, where):
    write_run(tmp_path / "r", args_json(_tiny_vit(), 1), [10.0])
    (tmp_path / "file").write_text("keep me")
    res = subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), str(tmp_path / "r"), "--no-flops",
                          "--plots", str(tmp_path / where)], cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"summarize.py: error: --plots {tmp_path / where}: "
        + ("is a file" if where == "file" else f"is under the file {tmp_path / 'file'}") + ", not a folder"]
    assert (tmp_path / "file").read_text() == "keep me"


def test_runs_moved_aside_by_overwrite_are_not_extra_runs(tmp_path):
    """main.py --overwrite leaves the earlier run in <run>/old-<time>/; the summary reads only the live run,
    unless the old folder is named itself. A run merely named old-something is still a run."""
    from report.runargs import find_runs

    live = write_run(tmp_path / "r", args_json(_tiny_vit(), 1), [10.0])
    old = write_run(live / "old-20261129-120000", args_json(_tiny_vit(), 1), [9.0])
    again = write_run(live / "old-20261129-120000-2", args_json(_tiny_vit(), 1), [8.0])
    named = write_run(tmp_path / "old-runs", args_json(_tiny_vit(), 1), [7.0])
    assert find_runs([str(tmp_path)]) == sorted([str(live), str(named)])
    assert find_runs([str(old)]) == [str(old)] and find_runs([str(again / "log.txt")]) == [str(again)]


def _readme_between(start: str, end: str) -> str:
    text = " ".join((ROOT / "docs" / "reproducing.md").read_text().split())
    return text[text.index(start):text.index(end, text.index(start))]


def test_readme_names_what_is_compared_and_what_marks_a_run_mixed():
    """The backend changes pixels: --data-backend is compared, and a resume that changes it is a mixture. The
    README's lists (docs/reproducing.md) are the code's: every flag not compared, and every changed flag that
    marks a resumed run."""
    from report import common, recipes, runs
    from training import resume

    assert "data_backend" not in recipes.NOT_COMPARED
    assert "`--data-backend` is compared" in " ".join((ROOT / "docs" / "reproducing.md").read_text().split())
    not_compared = _readme_between("Not compared, as they cannot change", "A run resumed under changed flags")
    assert [f for f in sorted(recipes.NOT_COMPARED) if f"`{common.flag_name(f)}`" not in not_compared] == []
    marking = [flag for flag in resume.NOTED_CHANGES
               if runs.resumed_changes([{"resumed_with_changes": {flag: [1, 2]}, "epoch": 3}])]
    assert "data_backend" in marking and "epochs" in marking and "batch_size" not in marking
    mixed = _readme_between("A run resumed under changed flags", "Such a run never fills")
    named = [flag for flag in marking if (f"`{common.flag_name(flag)}`" if flag != "global_batch"
                                          else "global batch") in mixed]
    assert named == marking and "`--resume-changed-ok`" in mixed
    assert runs.resumed_changes([{"resumed_with_changes": {"data_backend": ["dali", "pil"]}, "epoch": 2}]) == [
        "data_backend dali -> pil at epoch 2"]


def test_your_runs_leave_how_a_run_ran_out_of_setup_and_pairing(summarize, tmp_path, capsys):
    """--overwrite, loader workers, the device or print frequency do not tell a ToE run from its baseline."""
    write_run(tmp_path / "base", args_json(_tiny_vit(), 1), [10.0, 12.0])
    write_run(tmp_path / "toe", args_json(_tiny_vit(["--toe-r1", "0.5", "--overwrite", "--num_workers", "4",
                                                     "--device", "cpu", "--print-freq", "5"]), 1), [11.0, 12.5])
    out = run_cli(summarize, [tmp_path, "--tables", "8", "--no-flops"], capsys)["out"]
    base, toe = _line(out, "base  "), _line(out, "toe  ")
    for flag in ("--overwrite", "--num_workers", "--device", "--print-freq"):
        assert flag not in base and flag not in toe, flag
    assert "12.50 (+0.50)" in toe  # paired with its baseline
    assert "without a baseline" not in out
