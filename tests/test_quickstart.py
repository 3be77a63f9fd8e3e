"""scripts/quickstart_report.py: the runs' steps are rebuilt from args.json (each ToE stage keeps the
tokens its schedule says), ToE's step time is weighted by the epochs of each stage, the table and its
ratios, and bad input. The whole quickstart runs in tests/test_scripts.py."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List

import pytest

from runtime import runlog
from conftest import TINY, load_script

ROOT = Path(__file__).resolve().parents[1]


report = load_script("scripts/quickstart_report.py")

RUN = TINY + ["--data-set", "FAKE", "--fake-size", "16", "--nb-classes", "10", "--batch-size", "4",
              "--epochs", "4", "--resume", "none", "--no-model-ema"]
TOE = ["--toe-r1", "0.5", "--toe-ng", "3", "--toe-k", "2"]


def _write_args(folder: Path, argv: List[str]) -> None:
    """args.json as main.py writes it: the resolved flags of config.from_args."""
    import config
    import main

    folder.mkdir(parents=True)
    cfg = config.from_args(main.get_args_parser().parse_args(argv + ["--output_dir", str(folder)]))
    (folder / "args.json").write_text(json.dumps(cfg.flags))


def _write_log(folder: Path, rows: List[Dict[str, float]]) -> None:
    folder.mkdir(parents=True)
    for epoch, row in enumerate(rows):
        runlog.append(str(folder / "log.txt"), {"epoch": epoch, "test_acc1": 50.0 + epoch, "test_acc5": 90.0,
                                                **row})


def test_step_times_rebuild_each_stage_and_weight_it_by_its_epochs(tmp_path, monkeypatch):
    """4 epochs over ng = 3 stages: epochs 0-1 are stage 1, epoch 2 stage 2, epoch 3 stage 3 (Schedule:
    floor(3e/4) + 1), so ToE's step = (2 t1 + t2 + t3) / 4. Each timed configuration runs the model of
    its run: 64 patches + CLS reach the last block as 65 / 33 / 49 / 65 tokens (keep 0.5, 0.75, 1.0)."""
    from training import builders
    from runtime import steptime

    _write_args(tmp_path / "baseline", RUN)
    _write_args(tmp_path / "toe", RUN + TOE)
    cfgs = {name: report.run_config(tmp_path / name) for name in report.RUNS}
    assert report.stage_epochs(cfgs["toe"]) == [1, 1, 2, 3] and report.stage_epochs(cfgs["baseline"]) == [0] * 4

    tokens: List[int] = []
    build = builders.build_model

    def recording_build(*args, **kwargs):
        model, rep = build(*args, **kwargs)
        model.blocks[-1].register_forward_pre_hook(lambda m, a: tokens.append(a[0].shape[1]))
        return model, rep

    fake = {"baseline": [8.0, 6.0, 7.0], "toe stage 1": [3.0, 5.0, 4.0], "toe stage 2": [6.0, 6.0, 5.0],
            "toe stage 3": [9.0, 7.0, 8.0]}
    asked = {}

    def fake_times(steps, reps, settle, device, clock):
        asked.update(names=list(steps), reps=reps, settle=settle, clock=clock)
        return fake

    monkeypatch.setattr(builders, "build_model", recording_build)
    monkeypatch.setattr(steptime, "time_interleaved", fake_times)
    step_s, how = report.step_times(cfgs, reps=3, warmup=1, settle=1)

    assert tokens == [65, 33, 49, 65]  # the warm-up round ran every configuration once, in order
    assert asked == {"names": list(fake), "reps": 3, "settle": 1, "clock": steptime.CLOCKS["cpu"]}
    assert step_s["baseline"] == statistics.median(fake["baseline"]) == 7.0
    assert step_s["toe"] == pytest.approx((2 * 4.0 + 6.0 + 8.0) / 4)
    assert how.startswith("step ms: median of 3 training steps after warm-up, CPU time (1 thread)")


def test_run_summary_and_report_lines(tmp_path):
    _write_log(tmp_path / "baseline", [{"train_img_per_s": 100.0, "epoch_time": 2.0, "gflops_per_iter": 10.0,
                                        "toe_tokens": 64}] * 2)
    _write_log(tmp_path / "toe", [{"train_img_per_s": 200.0, "epoch_time": 1.0, "gflops_per_iter": 5.0,
                                   "toe_tokens": 32},
                                  {"train_img_per_s": 100.0, "epoch_time": 3.0, "gflops_per_iter": 11.0,
                                   "toe_tokens": 64}])
    summaries = {name: report.run_summary(tmp_path / name) for name in report.RUNS}
    # img/s over the whole training: (200 x 1 + 100 x 3) images in 4 s
    assert summaries["toe"]["img_s"] == pytest.approx(125.0) and summaries["toe"]["train_s"] == 4.0
    assert summaries["toe"]["gflops"] == pytest.approx(8.0) and summaries["toe"]["tokens"] == "32/64"
    assert summaries["toe"]["acc1"] == 51.0

    text = report.format_report(summaries, {"baseline": 0.5, "toe": 0.4}, "step ms: how", tmp_path)
    lines = text.splitlines()
    assert lines[1].split() == ["run", "acc@1", "acc@5", "train", "img/s", "train", "s", "step", "ms",
                                "GFLOPs/iter", "tokens/epoch"]
    assert lines[2].split() == ["baseline", "51.00", "90.00", "100.0", "4.0", "500.0", "10.000", "64/64"]
    assert lines[3].split() == ["ToE", "51.00", "90.00", "125.0", "4.0", "400.0", "8.000", "32/64"]
    assert lines[4:6] == ["step ms: how", "ToE/baseline: 1.25x faster training step, 1.25x fewer GFLOPs"]
    assert lines[6] == f"more (best/final top-1, GPU hours, speed-ups): python scripts/summarize.py {tmp_path}"


@pytest.mark.parametrize("make, message", [
    (lambda out: None, "baseline/log.txt holds no finished epoch"),
    (lambda out: [_write_log(out / n, [{"train_img_per_s": 1.0, "epoch_time": 1.0, "toe_tokens": 4}])
                  for n in ("baseline", "toe")], "cannot read"),
])
def test_bad_out_is_one_error_line(tmp_path, capsys, make, message):
    make(tmp_path)
    assert report.main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: ") and message in captured.err


def test_bad_flag_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path), "--reps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --reps must be >= 1")
