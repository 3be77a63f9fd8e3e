"""EfficientTrain curriculum (Table 4) through main.py: per-epoch input size, RandAugment magnitude, ToE tokens,
GFLOPs, and resume in the middle of the curriculum."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, child_env, main_inprocess, read_log
from conftest import killed_main
from test_train_e2e import _assert_state_equal, _load

# final 64 px, patch 8: EfficientTrain's 5/7, 5/7, 5/7, 6/7, 1 -> 48, 48, 48, 56, 64
CURRICULUM = ["--model", "deit_tiny_patch16_224", "--input-size", "64", "--patch-size", "8",
              "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2", "--device", "cpu", "--num_workers", "0",
              "--data-set", "FAKE", "--fake-size", "48", "--batch-size", "16", "--epochs", "5",
              "--curriculum", "efficienttrain", "--toe-r1", "0.6", "--toe-r0", "0.3", "--warmup-epochs", "1",
              "--model-ema-decay", "0.9", "--seed", "3"]
SIZES = [48, 48, 48, 56, 64]
MAGNITUDES = [1, 3, 5, 7, 9]


def _expected_tokens(epoch: int) -> int:
    """floor(r_delta * M) at the epoch's size: stages of 5 epochs over ng = 3 start at 0, 2, 4."""
    keep = {0: 0.6, 1: 0.6, 2: 0.8, 3: 0.8, 4: 1.0}[epoch]
    patches = (SIZES[epoch] // 8) ** 2
    return int(math.floor(keep * patches + 1e-6))


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess (OMP_NUM_THREADS=1): bitwise comparisons need it
    try:
        code, stdout, err = main_inprocess(CURRICULUM + ["--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    (out / "stdout.txt").write_text(stdout)  # beside the run: its start-up lines
    return out, read_log(out / "log.txt")


def test_sizes_magnitudes_and_tokens_per_epoch(curriculum_run):
    _, rows = curriculum_run
    assert [r["epoch"] for r in rows] == list(range(5))
    assert [r["train_input_size"] for r in rows] == SIZES
    assert [r["aa_magnitude"] for r in rows] == MAGNITUDES
    assert [r["toe_tokens"] for r in rows] == [_expected_tokens(e) for e in range(5)]
    assert all(r["num_patches"] == 64 for r in rows)  # evaluation at the final size


def test_gflops_follow_size_and_stage(curriculum_run):
    """Each epoch's GFLOPs are toe.flops' count (the one FLOPs formula, tested on its own in test_flops.py) of a
    model built at that epoch's size (fixed size, no pos_embed interpolation), at that epoch's ToE stage."""
    import timm

    import toe
    from toe import flops

    _, rows = curriculum_run
    schedule = toe.Schedule(r1=0.6, r0=0.3, ng=3, k=2, epochs=5)
    for row in rows:
        size = row["train_input_size"]
        model = timm.create_model("deit_tiny_patch16_224", img_size=size, patch_size=8, depth=2, embed_dim=32,
                                  num_heads=2, num_classes=10)
        counted = flops.gflops_per_iteration(model, schedule, layer=1, batch_size=16, img_size=size)
        per_stage = {s["stage"]: s["gflops"] for s in counted["stages"]}
        assert row["gflops_per_iter"] == pytest.approx(per_stage[row["toe_stage"]], rel=1e-9), row
    # the curriculum makes early epochs cheaper than the final size at the same stage
    assert rows[0]["gflops_per_iter"] < rows[4]["gflops_per_iter"] * 0.6


def test_startup_gflops_line_is_the_runs_mean_as_logged(curriculum_run):
    """The start-up line prints the mean log.txt will hold (each epoch at its phase size and stage), which is
    what summarize.py averages for a curriculum run; not the final size's per-stage counts."""
    out, rows = curriculum_run
    (line,) = [ln for ln in (out / "stdout.txt").read_text().splitlines() if ln.startswith("GFLOPs per iteration")]
    logged = [r["gflops_per_iter"] for r in rows]
    assert f"mean {sum(logged) / len(logged):.4g} over the run's 5 epochs" in line, line
    # every (size, stage) step of the run, in order, as logged
    steps = []
    for r in rows:
        step = f"{r['train_input_size']} px stage {r['toe_stage']}: {r['gflops_per_iter']:.4g}"
        if not steps or steps[-1] != step:
            steps.append(step)
    assert ", ".join(steps) in line, line
    # the last epoch keeps every token at the final size: the baseline's count
    assert f"baseline {rows[-1]['gflops_per_iter']:.4g} (all tokens at 64 px" in line, line


def test_resume_mid_curriculum_is_bitwise(curriculum_run, tmp_path):
    import subprocess

    ref_out, ref_rows = curriculum_run
    out = tmp_path / "killed"
    proc = subprocess.run(killed_main(3, 1) + CURRICULUM + ["--output_dir", str(out), "--print-freq", "1"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode < 0, proc.stderr[-2000:]  # killed in epoch 3, the first of phase 4 (56 px)
    assert [r["epoch"] for r in read_log(out / "log.txt")] == [0, 1, 2]
    code, stdout, err = main_inprocess(CURRICULUM + ["--output_dir", str(out)])
    assert code == 0, err
    rows = read_log(out / "log.txt")
    assert [r["train_input_size"] for r in rows] == SIZES
    for a, b in zip(ref_rows, rows):
        assert (a["train_loss"], a["test_acc1"], a["toe_tokens"]) == (b["train_loss"], b["test_acc1"], b["toe_tokens"])
    ref, got = _load(ref_out / "checkpoint.pth"), _load(out / "checkpoint.pth")
    _assert_state_equal(ref["model"], got["model"], "model")
    _assert_state_equal(ref["model_ema"], got["model_ema"], "model_ema")


def test_curriculum_table_flag_and_bad_tables():
    from main import get_args_parser
    import config
    from runtime.errors import UsageError

    base = [a for a in CURRICULUM if a not in ("--curriculum", "efficienttrain")]
    args = get_args_parser().parse_args(base + ["--curriculum-table", "0:32:2,3:64:6"])
    cfg = config.from_args(args)
    assert [cfg.curriculum.input_size(e) for e in range(5)] == [32, 32, 32, 64, 64]
    assert [cfg.curriculum.magnitude(e) for e in range(5)] == [2, 2, 2, 6, 6]
    for table in ("5:32:2", "0:33:2", "0:32"):
        with pytest.raises(UsageError, match="--curriculum"):
            config.from_args(get_args_parser().parse_args(base + ["--curriculum-table", table]))
    with pytest.raises(UsageError, match="not both"):
        config.from_args(get_args_parser().parse_args(CURRICULUM + ["--curriculum-table", "0:32:2"]))


def test_batch_scale_keeps_the_global_batch_and_the_update(tmp_path):
    """--curriculum-batch-scale: at half the final size a micro-batch of 2B with 1 accumulation step replaces
    2 micro-batches of B. The sampler's index stream is the same, and without random layers or mixup each
    optimizer step averages the same 2B samples, so the weights agree to float precision."""
    base = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--patch-size", "4",
            "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2", "--device", "cpu", "--num_workers", "0",
            "--data-set", "FAKE", "--fake-size", "64", "--batch-size", "8", "--grad-accum-steps", "2",
            "--epochs", "2", "--curriculum-table", "0:16:0,1:32:0", "--reprob", "0",
            "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--no-repeated-aug", "--no-model-ema",
            "--warmup-epochs", "0", "--unscale-lr", "--lr", "0.05", "--seed", "5",
            # SGD: the update is linear in the gradient; Adam would turn float noise in near-zero gradients
            # (e.g. the key bias, which softmax ignores) into full-size steps
            "--opt", "sgd", "--weight-decay", "0"]
    threads = torch.get_num_threads()
    outs = {}
    for name, extra in (("plain", []), ("scaled", ["--curriculum-batch-scale"])):
        outs[name] = tmp_path / name
        code, _, err = main_inprocess(base + extra + ["--output_dir", str(outs[name])])
        assert code == 0, err
    assert torch.get_num_threads() == threads
    plain, scaled = read_log(outs["plain"] / "log.txt"), read_log(outs["scaled"] / "log.txt")
    # (32 / 16)^2 = 4, lowered to 2, the largest divisor of --grad-accum-steps 2; the final size is unscaled
    assert [(r["micro_batch"], r["grad_accum_steps"]) for r in scaled] == [(16, 1), (8, 2)]
    assert [(r["micro_batch"], r["grad_accum_steps"]) for r in plain] == [(8, 2), (8, 2)]
    a = _load(outs["plain"] / "checkpoint.pth")["model"]
    b = _load(outs["scaled"] / "checkpoint.pth")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # really two different step layouts


def test_batch_scale_needs_a_curriculum():
    code, _, err = main_inprocess(["--data-set", "FAKE", "--curriculum-batch-scale"])
    assert code == 2 and err.strip() == "error: --curriculum-batch-scale needs --curriculum or --curriculum-table"


@pytest.mark.parametrize("mode", ["fourier", "resize"])
def test_downsample_mode_decides_where_images_shrink(mode, tmp_path, monkeypatch):
    """fourier: the loader yields --input-size images and every smaller phase's batch goes through
    frequency_crop on the device (none at the final size); resize: the loader yields phase-size images and
    frequency_crop never runs. The log reports the model's input size either way."""
    import engine
    import toe.curriculum

    crops, batches = [], []
    real_crop, real_epoch = toe.curriculum.frequency_crop, engine.train_one_epoch

    def crop(images, size):
        crops.append((images.shape[-1], size))
        return real_crop(images, size)

    def epoch(model, criterion, loader, *args, **kwargs):
        batches.append(next(iter(loader))[0].shape[-1])  # the loader's image size this epoch
        return real_epoch(model, criterion, loader, *args, **kwargs)

    monkeypatch.setattr(toe.curriculum, "frequency_crop", crop)
    monkeypatch.setattr(engine, "train_one_epoch", epoch)
    code, _, err = main_inprocess(CURRICULUM + ["--curriculum-downsample", mode, "--fake-size", "32",
                                                "--output_dir", str(tmp_path)])
    assert code == 0, err
    rows = read_log(tmp_path / "log.txt")
    assert [r["train_input_size"] for r in rows] == SIZES
    assert [r["toe_tokens"] for r in rows] == [_expected_tokens(e) for e in range(5)]
    if mode == "fourier":
        assert batches == [64] * 5
        assert sorted(set(crops)) == [(64, 48), (64, 56)] and len(crops) == 4 * 2  # 2 batches per epoch
    else:
        assert batches == SIZES and crops == []
    assert json.loads((tmp_path / "args.json").read_text())["curriculum_downsample"] == mode


def test_downsample_mode_is_part_of_the_experiment(tmp_path):
    """A resume under the other mode is refused (a different experiment), as for the other curriculum flags."""
    out = tmp_path / "run"
    # every phase trains at least once (a shorter run is refused), then the resume asks for one more epoch
    args = CURRICULUM + ["--epochs", "5", "--toe-epochs", "5", "--fake-size", "32", "--output_dir", str(out)]
    code, _, err = main_inprocess(args)
    assert code == 0, err
    code, _, err = main_inprocess(args[:-2] + ["--epochs", "6", "--curriculum-downsample", "resize",
                                               "--output_dir", str(out)])
    assert code == 2 and "--curriculum-downsample fourier -> resize" in err, err


def test_fourier_needs_even_phase_sizes():
    code, _, err = main_inprocess(["--data-set", "FAKE", "--input-size", "42", "--patch-size", "7",
                                   "--curriculum-table", "0:21:1,1:42:9"])
    assert code == 2 and err.strip() == ("error: --curriculum-downsample fourier keeps size/2 frequencies each way, "
                                         "so every phase size must be even, got [21]; use even sizes or "
                                         "--curriculum-downsample resize")
    from main import get_args_parser
    import config

    args = get_args_parser().parse_args(["--data-set", "FAKE", "--input-size", "42", "--patch-size", "7",
                                         "--curriculum-table", "0:21:1,1:42:9", "--curriculum-downsample", "resize"])
    assert config.from_args(args).curriculum.downsample == "resize"  # resizing to an odd size is fine


# the real-image set: 1000 training JPEGs of 10 classes at 64 px, trained at 32 px (patch 4) for 5 epochs (one per
# phase: fewer would never train the final size, which main.py refuses): EfficientTrain's phases 24, 24, 24, 28,
# 32 px with magnitudes 1, 3, 5, 7, 9, ToE r1 0.6, the per-update schedule
REAL = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--model-kwargs", "patch_size=4", "depth=3",
        "embed_dim=64", "num_heads=2", "--device", "cpu", "--num_workers", "0", "--unscale-lr", "--lr", "2e-3",
        "--warmup-epochs", "0", "--drop-path", "0.0", "--data-set", "FOLDER", "--batch-size", "50", "--epochs", "5",
        "--curriculum", "efficienttrain", "--toe-r1", "0.6", "--toe-r0", "0.3", "--reprob", "0", "--mixup", "0",
        "--cutmix", "0", "--no-repeated-aug", "--model-ema-decay", "0.9", "--sched-on-updates", "--seed", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fourier", "resize"])
def test_real_images_learn_and_resume_bitwise_in_both_modes(mode, tmp_path, real_image_set):
    """About 60-80 s per mode on one CPU thread: the uninterrupted run, then one killed in epoch 1 and resumed."""
    import subprocess

    args = REAL + ["--data-path", str(real_image_set), "--curriculum-downsample", mode]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    code, _, err = main_inprocess(args + ["--output_dir", str(ref_out)])
    assert code == 0, err
    ref_rows = read_log(ref_out / "log.txt")
    assert [(r["train_input_size"], r["aa_magnitude"]) for r in ref_rows] == [(24, 1), (24, 3), (24, 5), (28, 7), (32, 9)]
    # chance is 10% (sd 1.7 points over 300 images); measured 18.3-22.0 (fourier), 19.7-20.3 (resize)
    assert max(r["test_acc1"] for r in ref_rows) > 17.0, [r["test_acc1"] for r in ref_rows]
    assert ref_rows[-1]["train_loss"] < ref_rows[0]["train_loss"]
    proc = subprocess.run(killed_main(1, 3) + args + ["--output_dir", str(out), "--print-freq", "1"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode < 0, proc.stderr[-2000:]
    code, _, err = main_inprocess(args + ["--output_dir", str(out)])
    assert code == 0, err
    rows = read_log(out / "log.txt")
    for a, b in zip(ref_rows, rows):
        assert (a["train_loss"], a["train_lr"], a["test_acc1"]) == (b["train_loss"], b["train_lr"], b["test_acc1"])
    ref, got = _load(ref_out / "checkpoint.pth"), _load(out / "checkpoint.pth")
    _assert_state_equal(ref["model"], got["model"], "model")
    _assert_state_equal(ref["model_ema"], got["model_ema"], "model_ema")
