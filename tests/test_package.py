"""`pip install .` gives the `toe` library alone, importable from outside the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, child_env

USE_OUTSIDE = """
import sys, toe, timm, torch
assert toe.__file__.startswith(sys.argv[1]), toe.__file__
assert "models" not in sys.modules and "main" not in sys.modules  # nothing of the training repository
model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                          num_classes=3)
toe.apply(model, toe.Schedule(r1=0.5, ng=2, k=2, epochs=4))
toe.set_epoch(model, 0)
model.train()
model(torch.randn(2, 3, 32, 32)).sum().backward()
print(toe.last_index(model).shape[1])
"""


@pytest.mark.slow
def test_pip_install_gives_the_toe_library(tmp_path):
    target = tmp_path / "site"
    source = tmp_path / "source"  # a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "toe", source / "toe", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                            "--target", str(target), str(source)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PIP_NO_INDEX": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    assert all((target / "toe" / name).is_file() for name in ("ops.py", "flops.py", "flops_cli.py"))
    assert not (target / "models").exists() and not (target / "main.py").exists()  # the library only
    assert list((target / "bin").glob("toe-flops")), "console script toe-flops missing"
    env = child_env()
    env["PYTHONPATH"] = str(target)  # not the repository
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run([sys.executable, "-c", USE_OUTSIDE, str(target)], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.strip()) == 1 + 32  # class token + floor(0.5 * 64) patch tokens
    # the installed command names itself in its errors
    (script,) = (target / "bin").glob("toe-flops")
    cli = subprocess.run([str(script), "--bogus"], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [
        "toe-flops: error: unrecognized arguments: --bogus"], cli.stderr[-3000:]
