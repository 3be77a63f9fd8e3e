"""toe.apply / set_epoch / remove on tiny timm ViTs."""
import copy

import pytest
import timm
import torch

import toe
from toe import Schedule

TINY = dict(img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2, num_classes=10)  # 64 patches


def tiny(name="deit_tiny_patch16_224", **overrides):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **overrides})


def tokens_seen_by(model, block):
    """Record the token count entering ``model.blocks[block]`` on the next forward."""
    seen = []
    handle = model.blocks[block].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    return seen, handle


def test_token_count_per_stage_and_layer():
    model = tiny()
    schedule = Schedule(r1=0.5, ng=3, k=2, epochs=3)
    toe.apply(model, schedule, layer=1)
    seen, handle = tokens_seen_by(model, 2)  # hooks run in registration order: block 1 sees the reduced input
    x = torch.randn(2, 3, 32, 32)
    model.train()
    for epoch in range(3):
        toe.set_epoch(model, epoch)
        model(x)
    assert seen == [1 + 32, 1 + 48, 1 + 64]
    assert toe.last_index(model) is None  # stage 3 keeps every token: no work done
    toe.set_epoch(model, 0)
    model(x)
    assert toe.last_index(model).shape == (2, 33)
    assert toe.last_assignment(model).shape == (2, 64)
    handle.remove()


@pytest.mark.parametrize("layer", [0, 2])
def test_other_layers(layer):
    model = tiny()
    toe.apply(model, Schedule(r1=0.5, epochs=3), layer=layer)
    seen, _ = tokens_seen_by(model, layer)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    # The record hook was registered after ToE's, so it sees the reduced sequence.
    assert seen == [33]


def test_eval_is_the_unpatched_model_and_sparse_eval_reduces():
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        toe.apply(model, Schedule(r1=0.5, epochs=3))
        assert torch.equal(model(x), ref)
        assert toe.last_index(model) is None
        toe.remove(model)
        toe.apply(model, Schedule(r1=0.5, epochs=3), sparse_eval=True)
        assert not torch.equal(model(x), ref)
        assert toe.last_index(model).shape == (3, 33)


@pytest.mark.parametrize("name, overrides, prefix", [
    ("deit_tiny_distilled_patch16_224", {}, 2),
    ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg"), 0),
    ("vit_tiny_patch16_224", dict(reg_tokens=4, global_pool="avg"), 5),
    ("deit3_small_patch16_224", {}, 1),
])
def test_train_step_on_variants(name, overrides, prefix):
    model = tiny(name, **overrides)
    toe.apply(model, Schedule(r1=0.5, epochs=3))
    toe.set_epoch(model, 0)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    loss.backward()
    index = toe.last_index(model)
    assert index.shape == (2, prefix + 32)
    assert index[:, :prefix].tolist() == [list(range(prefix))] * 2
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_grad_checkpointing_does_not_skip_toe():
    model = tiny()
    model.set_grad_checkpointing(True)
    toe.apply(model, Schedule(r1=0.5, epochs=3))
    seen, _ = tokens_seen_by(model, 2)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen and all(n == 33 for n in seen)
    # Same result as without checkpointing.
    ref = tiny()
    toe.apply(ref, Schedule(r1=0.5, epochs=3))
    ref.train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x))


def test_state_dict_is_plain_and_remove_restores():
    model = tiny()
    plain_keys = list(model.state_dict())
    forward_before = type(model).forward
    toe.apply(model, Schedule(r1=0.5, epochs=3))
    assert list(model.state_dict()) == plain_keys
    timm.create_model("deit_tiny_patch16_224", **TINY).load_state_dict(model.state_dict(), strict=True)
    assert toe.is_applied(model)
    toe.remove(model)
    assert not toe.is_applied(model)
    assert all(len(b._forward_pre_hooks) == 0 for b in model.blocks)
    assert type(model).forward is forward_before
    model.train()
    seen, _ = tokens_seen_by(model, 1)
    model(torch.randn(1, 3, 32, 32))
    assert seen == [65]


def test_deepcopy_gets_independent_state():
    model = toe.apply(tiny(), Schedule(r1=0.5, epochs=3))
    ema = copy.deepcopy(model)
    toe.set_epoch(model, 2)
    assert toe.current_rates(model)[-1] == 1.0
    assert toe.current_rates(ema)[-1] == 0.5
    toe.set_epoch(ema, 1)
    assert toe.current_rates(ema)[-1] == 0.75


def test_wrapped_models_are_unwrapped():
    model = toe.apply(tiny(), Schedule(r1=0.5, epochs=3))

    class Wrapper(torch.nn.Module):  # same attribute layout as DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(model)
    toe.set_epoch(wrapped, 1)
    assert toe.current_rates(model)[-1] == 0.75


def test_misuse_errors():
    model = tiny()
    with pytest.raises(RuntimeError, match="not applied"):
        toe.set_epoch(model, 0)
    with pytest.raises(ValueError, match="layer"):
        toe.apply(model, Schedule(r1=0.5), layer=3)
    with pytest.raises(ValueError, match="distance"):
        toe.apply(model, Schedule(r1=0.5), distance="cos")
    with pytest.raises(ValueError, match="blocks"):
        toe.apply(torch.nn.Linear(2, 2), Schedule(r1=0.5))
    toe.apply(model, Schedule(r1=0.5))
    with pytest.raises(RuntimeError, match="already applied"):
        toe.apply(model, Schedule(r1=0.5))


def test_compile_does_not_recompile_per_call():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = toe.apply(tiny(), Schedule(r1=0.5, epochs=3))
    model.train()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    graphs = []
    for epoch in (0, 0, 0, 1, 1, 1):
        toe.set_epoch(compiled, epoch)
        compiled(x)
        graphs.append(counters["stats"]["unique_graphs"])
    # Compiled once per stage (shapes are fixed within a stage), never once per call, and whole.
    assert graphs[0] == graphs[1] == graphs[2] < graphs[3] == graphs[4] == graphs[5]
    assert not counters["graph_break"]
    assert toe.last_index(model).shape == (2, 49)
