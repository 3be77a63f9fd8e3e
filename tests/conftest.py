"""Shared fixtures for the training-entry tests: a tiny ViT command line, subprocess/in-process runners,
the session's reference ToE run, and CIFAR files written in torchvision's python format."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# DeiT-tiny at 32 px, patch 4 (8x8 = 64 patches), depth 3, dim 64: a few ms per step on one core
TINY: List[str] = ["--model", "deit_tiny_patch16_224", "--input-size", "32",
                   "--model-kwargs", "patch_size=4", "depth=3", "embed_dim=64", "num_heads=2",
                   "--device", "cpu", "--num_workers", "0", "--unscale-lr", "--lr", "1e-3",
                   "--warmup-epochs", "0", "--drop-path", "0.0"]

# The reference run: FAKE data, 3 epochs of ToE (ng 3: keep 0.5 / 0.75 / 1.0), EMA and mixup/cutmix on.
E2E: List[str] = TINY + ["--data-set", "FAKE", "--fake-size", "320", "--batch-size", "32", "--epochs", "3",
                         "--toe-r1", "0.5", "--toe-ng", "3", "--toe-k", "2", "--model-ema-decay", "0.9",
                         "--seed", "7"]


def child_env() -> Dict[str, str]:
    # One thread per process: the 2-core CI box is shared with other test processes (and torchrun's 2 ranks).
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def run_main(args: Sequence[str], timeout: float = 300, launcher: Optional[List[str]] = None
             ) -> subprocess.CompletedProcess:
    """python main.py ARGS (or LAUNCHER main.py ARGS) in a subprocess; returns the finished process."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "main.py")] + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than two on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_HOOKED_MAIN = """
import os, signal, sys
sys.path.insert(0, {root!r})
from runtime import progress
_step = progress.Progress.step
def step(self, *args, **kwargs):
    _step(self, *args, **kwargs)
    if self.title == "train epoch {epoch}" and self.done == {iteration}:
        {action}
progress.Progress.step = step
import main
sys.exit(main.main(sys.argv[1:]))
"""


def hooked_main(epoch: int, iteration: int, action: str) -> List[str]:
    """A command running main.py (append its flags) in a process that runs the Python statement ``action``
    right after `iteration` of `epoch`: a deterministic point, with no test hook in the training code."""
    return [sys.executable, "-c", _HOOKED_MAIN.format(root=str(ROOT), epoch=int(epoch), iteration=int(iteration),
                                                      action=action)]


def killed_main(epoch: int, iteration: int) -> List[str]:
    """:func:`hooked_main` that SIGKILLs itself at that point (a crash or a pre-emption without warning)."""
    return hooked_main(epoch, iteration, "os.kill(os.getpid(), signal.SIGKILL)")


def one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    """Assert a refusal: exit 2, one ``error: ...`` line holding every needle, no traceback, no training."""
    assert code == 2, (code, out[-1500:], err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "train epoch" not in out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def load_script(relative_path: str) -> types.ModuleType:
    """A repository script that is not importable as a package module (benchmarks/*.py, scripts/*.py), loaded
    from its file as a module named after it."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_inprocess(args: Sequence[str]) -> tuple:
    """Run main.main(args) in this process; returns (exit code, stdout, stderr)."""
    import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main.main(list(args))
    return code, out.getvalue(), err.getvalue()


def last_json(text: str) -> dict:
    """The last stdout line that is a JSON object (main.py --eval / --throughput print one)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{text[-2000:]}")


def read_log(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory) -> Dict[str, object]:
    """The uninterrupted reference run (subprocess); tests read its output_dir."""
    out = tmp_path_factory.mktemp("e2e")
    proc = run_main(E2E + ["--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "args": E2E}


def write_cifar(root: Path, name: str, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write CIFAR10/CIFAR100 in torchvision's python layout (uint8 [N, 3072] 'data' + labels) under root."""
    rng = np.random.default_rng(seed)
    if name == "CIFAR10":
        folder, classes = root / "cifar-10-batches-py", [f"c{i}" for i in range(10)]
        train_files, test_files, meta, meta_key, label_key = (
            [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "label_names", "labels")
    else:
        folder, classes = root / "cifar-100-python", [f"f{i}" for i in range(100)]
        train_files, test_files, meta, meta_key, label_key = (["train"], ["test"], "meta", "fine_label_names",
                                                               "fine_labels")
    folder.mkdir(parents=True, exist_ok=True)

    def dump(fname: str, n: int) -> None:
        labels = rng.integers(0, len(classes), n)
        # class-coloured images so the files are plausible data, plus noise
        base = (labels[:, None] * 37 % 256).astype(np.int64)
        data = np.clip(base + rng.integers(-40, 40, (n, 3072)), 0, 255).astype(np.uint8)
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": data, label_key: labels.tolist(), "filenames": [f"{i}.png" for i in range(n)]}, f)

    per = max(n_train // len(train_files), 1)
    for f in train_files:
        dump(f, per)
    for f in test_files:
        dump(f, n_test)
    with open(folder / meta, "wb") as f:
        pickle.dump({meta_key: classes}, f)
    return root


@pytest.fixture(scope="session")
def real_image_set() -> Path:
    """imagenette-mini-64 (10 ImageNet classes, 64 px, 1000 train / 300 val JPEGs): $TOE_TEST_DATA, default
    ../shared/data/imagenette-mini-64 beside the checkout. Skipped when absent, unless TOE_REQUIRE_TEST_DATA=1
    (CI), where a missing set fails the run."""
    data = Path(os.environ.get("TOE_TEST_DATA", str(ROOT.parent / "shared" / "data" / "imagenette-mini-64")))
    if (data / "train").is_dir() and (data / "val").is_dir():
        return data
    message = (f"real-image test set not found at {data}: set TOE_TEST_DATA to an ImageFolder root with train/ "
               f"and val/ (the project's imagenette-mini-64 lies in shared/data/ beside the CI checkout; any small "
               f"ImageNet subset with 10 classes at 64 px works)")
    if os.environ.get("TOE_REQUIRE_TEST_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_transformers():
    """Hugging Face transformers (requirements-hf.txt, ``pip install .[hf]``), for module-level use: skips the
    calling test module with the reason when it is absent, unless TOE_REQUIRE_HF=1 (CI), where it fails."""
    reason = "Hugging Face transformers is not installed: pip install -r requirements-hf.txt (or pip install .[hf])"
    if os.environ.get("TOE_REQUIRE_HF") == "1":
        try:
            import transformers
        except ImportError as e:
            pytest.fail(f"{reason} ({e})", pytrace=False)
        return transformers
    return pytest.importorskip("transformers", reason=reason)
