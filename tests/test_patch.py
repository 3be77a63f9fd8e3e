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


def by_hand(plain, x, layer, rates, k, **options):
    """The patched forward composed by hand from timm's public pieces on an unpatched model:
    head(norm(blocks[layer:](token_expansion(blocks[:layer](embed(x))))))."""
    tokens = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(x))))
    for block in plain.blocks[:layer]:
        tokens = block(tokens)
    if (plain.training or options.pop("sparse_eval", False)) and rates[-1] < 1.0:
        tokens, _ = toe.token_expansion(tokens, rates, k, num_prefix_tokens=plain.num_prefix_tokens, **options)
    for block in plain.blocks[layer:]:
        tokens = block(tokens)
    return plain.forward_head(plain.norm(tokens))


def total(out):
    """Scalar loss of logits or of the distilled (cls, dist) pair, with unequal weights per class."""
    outs = out if isinstance(out, tuple) else (out,)
    weights = torch.linspace(-1.0, 2.0, outs[0].shape[-1])
    return sum((o * weights).sum() for o in outs)


def patched_and_plain(name="deit_tiny_patch16_224", *, distilled=False, **overrides):
    """A patched model and an unpatched deep copy with the same weights (both without ToE so far)."""
    model = tiny(name, **overrides)
    if distilled:
        model.set_distilled_training(True)
    return model, copy.deepcopy(model)


def assert_same_gradients(model, plain):
    """Every parameter gradient is finite, nonzero, and equal to the hand composition's."""
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        ref = grads[name].grad
        assert p.grad is not None and ref is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7, msg=name)


OPTIONS = [
    {},
    dict(init="random"),
    dict(expand=False),
    dict(merge=False),
    dict(distance="euclidean"),
    dict(distance="manhattan"),
    dict(compat="official"),
    dict(compat="official", distance="euclidean", merge=False),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "distilled"])
def test_patched_forward_is_the_composition_by_hand(distilled, layer, options):
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    model, plain = patched_and_plain(name, distilled=distilled)
    schedule = Schedule(r1=0.4, ng=3, k=2, r0=0.2, epochs=3)  # stage 2: 44 tokens, 43 with compat="official"
    toe.apply(model, schedule, layer=layer, **options)
    toe.set_epoch(model, 1)
    model.train()
    plain.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(layer))
    images = x.clone().requires_grad_(True)
    torch.manual_seed(5)  # init="random" draws from the global generator, identically in both runs
    out = model(images)
    torch.manual_seed(5)
    ref = by_hand(plain, x.clone().requires_grad_(True), layer, schedule.rates(2), schedule.k, **options)
    if distilled:
        assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    total(out).backward()
    total(ref).backward()
    assert_same_gradients(model, plain)
    kept = 43 if options.get("compat") == "official" and options.get("expand", True) else 44
    assert toe.last_index(model).shape == (2, model.num_prefix_tokens + kept)
    # Pixels reach the loss through their patch token; at layer 0 without merging, dropped patches get none.
    pixel = images.grad.abs().reshape(2, 3, 8, 4, 8, 4).sum(dim=(1, 3, 5)).reshape(2, 64)
    assert torch.isfinite(images.grad).all()
    if layer == 0 and not options.get("merge", True):
        dropped = toe.last_assignment(model) < 0
        assert dropped.sum() == 2 * (64 - kept)
        assert (pixel[dropped] == 0).all() and (pixel[~dropped] > 0).all()
    else:
        assert (pixel > 0).all()


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


def test_eval_is_the_unpatched_model_and_sparse_eval_is_the_composition():
    model = tiny()
    plain = copy.deepcopy(model).eval()
    x = torch.randn(3, 3, 32, 32)
    schedule = Schedule(r1=0.5, epochs=3)
    model.eval()
    with torch.no_grad():
        ref = plain(x)
        toe.apply(model, schedule)
        assert torch.equal(model(x), ref)
        assert toe.last_index(model) is None
        toe.remove(model)
        toe.apply(model, schedule, sparse_eval=True, distance="euclidean")
        for epoch in (0, 1):
            toe.set_epoch(model, epoch)
            rates = schedule.rates(epoch + 1)
            expected = by_hand(plain, x, 1, rates, schedule.k, distance="euclidean", sparse_eval=True)
            torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
            assert toe.last_index(model).shape == (3, 1 + (32, 48)[epoch])
        assert (model(x) - ref).abs().max() > 1e-3  # the reduction does change the logits


@pytest.mark.parametrize("name, overrides, prefix", [
    ("deit_tiny_distilled_patch16_224", {}, 2),
    ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg"), 0),
    ("vit_tiny_patch16_224", dict(reg_tokens=4, global_pool="avg"), 5),
    ("deit3_small_patch16_224", {}, 1),
])
def test_train_step_on_variants(name, overrides, prefix):
    model, plain = patched_and_plain(name, **overrides)
    toe.apply(model, Schedule(r1=0.5, epochs=3))
    toe.set_epoch(model, 0)
    model.train()
    plain.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    ref = by_hand(plain, x, 1, [0.25, 0.5], 2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    total(out).backward()
    total(ref).backward()
    index = toe.last_index(model)
    assert index.shape == (2, prefix + 32)
    assert index[:, :prefix].tolist() == [list(range(prefix))] * 2
    assert_same_gradients(model, plain)


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
    with pytest.raises(ValueError, match="compat"):
        toe.apply(model, Schedule(r1=0.5), compat="paper")
    with pytest.raises(ValueError, match="init"):
        toe.apply(model, Schedule(r1=0.5), init="grid")
    with pytest.raises(ValueError, match="blocks"):
        toe.apply(torch.nn.Linear(2, 2), Schedule(r1=0.5))
    toe.apply(model, Schedule(r1=0.5))
    with pytest.raises(RuntimeError, match="already applied"):
        toe.apply(model, Schedule(r1=0.5))


def test_unwrap_model_strips_ddp_and_compile_in_any_nesting(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny()
    compiled = torch.compile(model, backend="eager")  # compiles lazily: nothing runs here
    assert toe.unwrap_model(model) is model
    assert toe.unwrap_model(compiled) is model
    assert toe.unwrap_model(torch.nn.DataParallel(compiled)) is model  # CPU-only DataParallel just wraps
    linear = torch.nn.Linear(2, 2)
    assert toe.unwrap_model(linear) is linear

    class Holder(torch.nn.Module):  # has a child called `module` but is a model of its own, not a wrapper
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(2, 2)
            self.head = torch.nn.Linear(2, 2)

    holder = Holder()
    assert toe.unwrap_model(holder) is holder
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert toe.unwrap_model(ddp) is model
        assert toe.unwrap_model(torch.compile(ddp, backend="eager")) is model
        assert toe.unwrap_model(DistributedDataParallel(compiled)) is model
        toe.apply(ddp, Schedule(r1=0.5, epochs=3))
        toe.set_epoch(torch.compile(ddp, backend="eager"), 1)
        assert toe.current_rates(model)[-1] == 0.75
    finally:
        dist.destroy_process_group()
