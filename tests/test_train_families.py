"""main.py trains timm's EVA-02 and BEiT with ToE on FAKE data (tiny configurations), counts their GFLOPs per
stage, saves the plain models' state_dict, and refuses a timm model ToE cannot patch before writing anything."""
from __future__ import annotations

import pytest
import timm
import torch

from conftest import main_inprocess, read_log

ARGS = ["--input-size", "32", "--model-kwargs", "patch_size=4", "depth=3", "embed_dim=64", "num_heads=2",
        "--device", "cpu", "--num_workers", "0", "--unscale-lr", "--lr", "1e-3", "--warmup-epochs", "0",
        "--drop-path", "0.0", "--data-set", "FAKE", "--fake-size", "64", "--batch-size", "32", "--epochs", "2",
        "--toe-r1", "0.5", "--toe-ng", "2", "--toe-k", "2", "--seed", "3"]


@pytest.mark.parametrize("model", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_main_trains_with_toe(model, tmp_path):
    code, out, err = main_inprocess(["--model", model, "--output_dir", str(tmp_path)] + ARGS)
    assert code == 0, err[-3000:]
    log = read_log(tmp_path / "log.txt")
    assert [e["toe_stage"] for e in log] == [1, 2]
    assert [e["toe_tokens"] for e in log] == [32, 64]
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in log)
    assert log[0]["gflops_per_iter"] < 0.75 * log[1]["gflops_per_iter"]
    saved = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    plain = timm.create_model(model, img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2, num_classes=10)
    assert sorted(saved) == sorted(plain.state_dict())


def test_main_refuses_a_timm_model_toe_cannot_patch(tmp_path):
    out_dir = tmp_path / "run"
    args = ["--model", "test_vit_relpos", "--output_dir", str(out_dir)] + ARGS
    code, out, err = main_inprocess(args)
    assert code == 2
    assert "error:" in err and "ToE cannot patch VisionTransformerRelPos" in err
    assert "--model test_vit_relpos: " in err and "--toe-layer" not in err and err.count("\n") == 1
    assert not out_dir.exists()
