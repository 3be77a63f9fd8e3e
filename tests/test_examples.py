"""examples/: each script trains offline on fake data with its default arguments, and its per-epoch lines show
ToE's token count following the stages (keep 0.5 / 0.75 / 1.0 of 64 patch tokens, plus the class token)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, require_transformers

EXPECTED = [("0", "0.50", 33), ("1", "0.75", 49), ("2", "1.00", 65)]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def epochs_printed(stdout: str, where: str):
    found = re.findall(rf"^epoch (\d+): keep rate ([\d.]+), (\d+) of 65 tokens enter {where} 1", stdout, flags=re.M)
    return [(epoch, rate, int(tokens)) for epoch, rate, tokens in found]


def test_torchvision_example_trains():
    run = run_example("train_torchvision_vit.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert epochs_printed(run.stdout, "block") == EXPECTED, run.stdout
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)$", run.stdout, flags=re.M)]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def test_hf_example_trains():
    require_transformers()
    run = run_example("train_hf_vit.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert epochs_printed(run.stdout, "layer") == EXPECTED, run.stdout
    assert re.search(r"^done: 3 epochs, training loss [\d.]+$", run.stdout, flags=re.M), run.stdout


@pytest.mark.parametrize("name", ["train_torchvision_vit.py", "train_hf_vit.py"])
@pytest.mark.parametrize("args, needle", [(["--r1", "2"], "r1"), (["--layer", "9"], "layer"),
                                          (["--bogus"], "unrecognized arguments")])
def test_examples_refuse_bad_input_in_one_line(name, args, needle):
    if name == "train_hf_vit.py":
        require_transformers()
    run = run_example(name, *args)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"{name}: error: ") and needle in lines[0]
