"""torch.compile with ToE: one compiled graph per stage for training plus one for evaluation, never per epoch."""
import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import toe
from toe import Schedule

TINY = dict(img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2, num_classes=10)  # 64 patches


def tiny(**overrides):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **{**TINY, **overrides})


def train_epochs(backend: str, schedule: Schedule, epochs: int, steps: int = 2):
    """Compile a patched tiny ViT and run ``epochs`` epochs of ``steps`` train steps plus one no-grad eval
    forward each. Returns (model, eager twin, per-epoch unique graph counts, last train/eval outputs)."""
    torch._dynamo.reset()
    counters.clear()
    model = toe.apply(tiny(), schedule)
    twin = copy.deepcopy(model)  # the same weights and hook, run eagerly
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graphs, outputs = [], []
    for epoch in range(epochs):
        toe.set_epoch(compiled, epoch)
        toe.set_epoch(twin, epoch)
        compiled.train()
        twin.train()
        for _ in range(steps):
            out = compiled(x)
            out.sum().backward()
        ref = twin(x)
        compiled.eval()
        twin.eval()
        with torch.no_grad():
            outputs.append((out.detach(), ref.detach(), compiled(x), twin(x)))
        graphs.append(counters["stats"]["unique_graphs"])
    return model, graphs, outputs


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_one_graph_per_stage_plus_eval(backend):
    schedule = Schedule(r1=0.5, ng=2, k=2, epochs=4)  # epochs 0-1: stage 1 (32 of 64 tokens); 2-3: all tokens
    model, graphs, outputs = train_epochs(backend, schedule, epochs=4)
    # Stage 1 train + eval on epoch 0, stage 2 train on epoch 2; nothing new on epochs 1 and 3.
    assert graphs == [2, 2, 3, 3], graphs
    assert graphs[-1] <= schedule.ng + 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["stats"].get("recompile_limit_hit", 0)
    for train_out, train_ref, eval_out, eval_ref in outputs:
        torch.testing.assert_close(train_out, train_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eval_out, eval_ref, rtol=1e-5, atol=1e-5)


def test_three_stages_and_last_selection_under_compile():
    schedule = Schedule(r1=0.5, ng=3, k=2, epochs=6)
    model, graphs, _ = train_epochs("eager", schedule, epochs=6, steps=1)
    assert graphs == [2, 2, 3, 3, 4, 4], graphs  # stages 1, 2, 3 + eval
    # last_index / last_assignment still work under compile (written back after the graph).
    compiled = torch.compile(model, backend="eager")
    toe.set_epoch(compiled, 2)  # stage 2: 48 of 64 tokens
    compiled.train()
    compiled(torch.randn(2, 3, 32, 32))
    assert toe.last_index(model).shape == (2, 1 + 48)
    assert toe.last_assignment(model).shape == (2, 64)
    assert counters["stats"]["unique_graphs"] == 4  # the cached stage-2 graph served this call


def test_set_epoch_touches_stage_state_only_at_stage_changes():
    model = toe.apply(tiny(), Schedule(r1=0.5, ng=3, k=2, epochs=9))
    hook = next(h for h in model.blocks[1]._forward_pre_hooks.values() if isinstance(h, toe.patch.ToEHook))
    seen = []
    for epoch in range(9):
        toe.set_epoch(model, epoch)
        seen.append(hook.rates)
        assert hook.epoch == epoch
    assert seen[0] is seen[1] is seen[2] and seen[3] is seen[4] is seen[5] and seen[6] is seen[8]
    assert seen[2] is not seen[3] and seen[5] is not seen[6]
    assert [list(r) for r in (seen[0], seen[3], seen[6])] == [[0.25, 0.5], [0.25, 0.5, 0.75], [0.25, 0.5, 0.75, 1.0]]
    toe.set_epoch(model, 0)
    assert hook.rates == (0.25, 0.5) and hook.stage == 1
    ema = copy.deepcopy(model)  # EMA copies keep their own stage state
    toe.set_epoch(model, 8)
    assert toe.current_rates(ema) == [0.25, 0.5] and toe.current_rates(model)[-1] == 1.0


def test_compiled_baseline_and_toe_model_side_by_side():
    # Two compiled instances of one class that differ only by the ToE hook: with hook guards on, each runs
    # its own graph (dynamo's default skips hook guards and would hand the second one the first one's graph).
    torch._dynamo.reset()
    plain = tiny().train()
    patched = toe.apply(copy.deepcopy(plain), Schedule(r1=0.5, ng=2, k=2, epochs=4)).train()
    x = torch.randn(2, 3, 32, 32)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled_plain = torch.compile(plain, backend="eager")
        compiled_patched = torch.compile(patched, backend="eager")
        torch.testing.assert_close(compiled_plain(x), plain(x), rtol=1e-5, atol=1e-5)
        out = compiled_patched(x)
        assert toe.last_index(patched).shape == (2, 1 + 32)
        torch.testing.assert_close(out, patched(x), rtol=1e-5, atol=1e-5)
        assert (out - plain(x)).abs().max() > 1e-3
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_one_graph_per_stage_plus_eval():
    schedule = Schedule(r1=0.5, ng=2, k=2, epochs=4)
    _, graphs, outputs = train_epochs("inductor", schedule, epochs=4)
    assert graphs == [2, 2, 3, 3], graphs
    for train_out, train_ref, eval_out, eval_ref in outputs:
        torch.testing.assert_close(train_out, train_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eval_out, eval_ref, rtol=1e-4, atol=1e-4)


def test_training_entry_compiles_once_per_stage_plus_eval():
    """main.py --compile over 4 epochs and 2 ToE stages, with a last validation batch smaller than the others
    (14 images in batches of 12): 2 training graphs + 1 evaluation graph, no recompilation per epoch. (A last
    batch of exactly one image would add one graph: dynamo specialises sizes 0 and 1.)"""
    from conftest import TINY as TINY_FLAGS, main_inprocess  # noqa: N811

    torch._dynamo.reset()
    counters.clear()
    code, out, err = main_inprocess(TINY_FLAGS + [
        "--data-set", "FAKE", "--fake-size", "70", "--batch-size", "8", "--epochs", "4", "--toe-r1", "0.5",
        "--toe-ng", "2", "--no-model-ema", "--compile", "--compile-backend", "eager"])
    assert code == 0, err
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["stats"].get("recompile_limit_hit", 0)
    assert "14 images" in out
    torch._dynamo.reset()
