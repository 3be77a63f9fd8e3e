"""benchmarks/bench_data.py on a tiny generated JPEG folder, and benchmarks/gpu_check.sh's guards (its full
CPU run is slow: it trains four times, two of them under torch.compile)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


bench_data = load_script("benchmarks/bench_data.py")


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """20 JPEGs of 40 x 48 px in train/<class>/ (2 classes), seeded noise."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(3)
    for c in range(2):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def run_bench(capsys, argv):
    code = bench_data.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_data_figures_and_worker_recommendation(jpeg_folder, capsys):
    rates = [0.5, 300.0, 1e6]
    code, out, err = run_bench(capsys, [
        "--data-path", str(jpeg_folder), "--input-size", "32", "--batch-size", "4", "--workers", "0", "1",
        "--repeats", "1", "--batches", "2", "--per-image", "6", "--prefetch-factors", "2", "--device", "cpu",
        "--train-img-per-s", "ToE stage 1 of DeiT-tiny=0.5", "300", "a=b=1e6", "--json"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])

    assert [row["workers"] for row in result["loader"]] == [0, 1]
    assert all(row["img_per_s"] > 0 and row["first_batch_s"] > 0 for row in result["loader"])
    # the per-worker rate is the 1-worker row; the 2-worker check is absent without a 2-worker row
    per_worker = result["loader"][1]["img_per_s"]
    assert result["per_worker_img_per_s"] == per_worker and result["per_worker_from"] == "1 worker"
    assert result["scaling_2_workers"] is None

    # every printed recommendation is ceil(rate / per-worker rate), the same as in the JSON
    printed = {m.group(1): (float(m.group(2)), int(m.group(3)))
               for m in re.finditer(r"^(.+) at (\S+) img/s needs >= (\d+) workers", out, re.M)}
    assert set(printed) == {"ToE stage 1 of DeiT-tiny", "training", "a=b"}
    for need, rate in zip(result["needs"], rates):
        expected = max(1, math.ceil(rate / per_worker))
        assert need["train_img_per_s"] == rate and need["workers"] == expected
        assert printed[need["label"]] == (rate, expected)
    assert result["needs"][2]["workers"] > 1  # 1e6 img/s is beyond one worker

    # the per-image breakdown adds up: decode + every transform step
    steps = result["per_image"]["steps_ms"]
    assert list(steps)[0] == "decode" and "RandAugment" in steps and len(steps) >= 5
    assert result["per_image"]["full_ms"] == pytest.approx(sum(steps.values()))
    assert result["per_image"]["full_img_per_s"] == pytest.approx(1e3 / sum(steps.values()))

    wins = result["wins"]
    assert wins["workers"] == 1 and wins["pin_memory"] is None and wins["channels_last"] is None
    assert wins["persistent_workers"]["off_s"] > 0 and wins["persistent_workers"]["on_s"] > 0
    assert [row["prefetch_factor"] for row in wins["prefetch_factor"]] == [2]
    assert "pin_memory + non_blocking: n/a" in out and "20 images, 2 classes" in out


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "3"], "--batch-size must be even"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--train-img-per-s", "stage=fast"], "expected LABEL=IMG_PER_S"),
    (["--train-img-per-s", "0"], "must be > 0"),
])
def test_bench_data_bad_arguments_one_line(jpeg_folder, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench_data.main(["--data-path", str(jpeg_folder)] + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "error:" in err and message in err


def test_bench_data_missing_folder_one_line(tmp_path, capsys):
    code, out, err = run_bench(capsys, ["--data-path", str(tmp_path / "nowhere"), "--workers", "0"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("bench_data.py: error:") and "nowhere" in err


def _script_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DEVICE", "QUICK", "DATA", "OUT")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return env


def test_gpu_check_syntax():
    proc = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("extra, message", [
    ({"CUDA_VISIBLE_DEVICES": ""}, "no CUDA device"),  # hides any GPU, so this holds on GPU machines too
    ({"DEVICE": "tpu"}, "DEVICE must be cuda or cpu"),
    ({"DEVICE": "cpu", "QUICK": "2"}, "QUICK must be 0 or 1"),
])
def test_gpu_check_refuses_with_one_line(tmp_path, extra, message):
    env = _script_env(OUT=str(tmp_path / "out"), **extra)
    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("gpu_check.sh: error:") and message in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing is written before the checks pass


@pytest.mark.slow
def test_gpu_check_cpu_quick_runs_every_part(tmp_path):
    out = tmp_path / "out"
    env = _script_env(DEVICE="cpu", QUICK="1", OUT=str(out))
    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == []
    assert set(summary["bench_toe"]) == {"deit_tiny_patch16_224"}
    runs = summary["train"]
    assert set(runs) == {"train_eager_toe", "train_eager_full", "train_compile_toe", "train_compile_full",
                         "torchrun_toe"}
    for name, rows in runs.items():
        assert [row["epoch"] for row in rows] == [0, 1], name
        assert all(row["train_img_per_s"] > 0 and row["epoch_time"] > 0 for row in rows), name
        # ToE r1 0.5, ng 2 over 2 epochs: keep rate 0.5 then 1; without ToE always 1
        assert [row["toe_keep_rate"] for row in rows] == ([0.5, 1.0] if name.endswith("_toe") else [1.0, 1.0])
    fake = summary["bench_data"]["bench_data_fake"]
    assert [need["label"] for need in fake["needs"]][:2] == ["DeiT-tiny full-token step", "ToE stage 1 of DeiT-tiny"]
    assert "==== gpu_check summary ====" in proc.stdout and "failed parts: none" in proc.stdout


def test_bench_toe_times_every_configuration_interleaved(capsys):
    """bench_toe.py on steptime: --reps CPU-clock times per configuration, the stage steps run with the
    tokens toe.flops counts, and the printed speed-up is the baseline's median over the schedule-weighted
    mean of the stages' medians."""
    import statistics

    bench_toe = load_script("benchmarks/bench_toe.py")
    code = bench_toe.main(["--img-size", "32", "--batch-size", "2", "--reps", "3", "--warmup", "1",
                           "--op-reps", "2", "--threads", "1", "--clock", "cpu", "--epochs", "4", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    times = result["times_s"]
    assert list(times) == ["baseline", "stage 1", "stage 2", "stage 3"]
    assert all(len(v) == 3 and min(v) > 0 for v in times.values())
    assert [line.split(":")[0] for line in out.err.splitlines() if line.startswith("rep ")] == \
        ["rep 1/3", "rep 2/3", "rep 3/3"]
    # 32 px, patch 16: 4 patches (+ CLS); keep 0.5 / 0.75 / 1.0 -> 2 / 3 / 4 patches; stages of 2, 1, 1 epochs
    assert [(s["tokens"], s["epochs"]) for s in result["stages"]] == [(3, 2), (4, 1), (5, 1)]
    med = {name: statistics.median(v) for name, v in times.items()}
    weighted = (2 * med["stage 1"] + med["stage 2"] + med["stage 3"]) / 4
    assert result["practical_speedup"] == pytest.approx(med["baseline"] / weighted)


def test_bench_toe_family_timm_eva_and_its_errors(capsys):
    """--family timm-eva times EVA-02-tiny (rotary rows follow the kept tokens); --model and --family
    together, or a model ToE refuses, end with one error line and exit 2."""
    bench_toe = load_script("benchmarks/bench_toe.py")
    code = bench_toe.main(["--family", "timm-eva", "--img-size", "56", "--batch-size", "2", "--reps", "1",
                           "--warmup", "0", "--settle", "0", "--op-reps", "1", "--threads", "1", "--epochs", "4",
                           "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["model"] == "eva02_tiny_patch14_224"
    # 56 px, patch 14: 16 patches (+ CLS); keep 0.5 / 0.75 / 1.0 -> 8 / 12 / 16 patches
    assert [s["tokens"] for s in result["stages"]] == [9, 13, 17]
    with pytest.raises(SystemExit) as both:
        bench_toe.main(["--family", "timm-eva", "--model", "deit_tiny_patch16_224"])
    assert both.value.code == 2 and "not both" in capsys.readouterr().err
    assert bench_toe.main(["--model", "test_vit_relpos", "--img-size", "32"]) == 2
    assert "error: ToE cannot patch VisionTransformerRelPos" in capsys.readouterr().err


@pytest.mark.parametrize("family,model", [("torchvision", "torchvision_vit_tiny"), ("transformers", "hf_vit_tiny")])
def test_bench_toe_family_torchvision_and_transformers(capsys, family, model):
    """--family torchvision / transformers time benchmarks/families.py's DeiT-tiny-sized model of that library,
    with the token counts of the schedule and toe.flops' theoretical speed-up (the same count as timm's)."""
    if family == "transformers":
        from conftest import require_transformers

        require_transformers()
    bench_toe = load_script("benchmarks/bench_toe.py")
    code = bench_toe.main(["--family", family, "--img-size", "64", "--batch-size", "2", "--reps", "1",
                           "--warmup", "0", "--settle", "0", "--op-reps", "1", "--threads", "1", "--epochs", "3",
                           "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["model"] == model
    # 64 px, patch 16: 16 patches (+ CLS); keep 0.5 / 0.75 / 1.0 -> 8 / 12 / 16 patches
    assert [s["tokens"] for s in result["stages"]] == [9, 13, 17]
    assert result["stages"][0]["theoretical"] > 1.5
