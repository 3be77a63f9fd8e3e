"""Checks shared by the per-family tests (torchvision, transformers): each family is described by a
``Case`` that builds a tiny model and composes its forward by hand from the model's own public pieces, so
the patched forward can be compared with an independent composition (embeddings, layers[:layer],
toe.token_expansion, layers[layer:])."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import torch
from torch import nn

import toe
from toe import Schedule

SCHEDULE = Schedule(r1=0.5, ng=3, k=2, epochs=3)  # epoch 0 keeps 0.5, epoch 1 0.75, epoch 2 every token
PATCHES = 64  # 32 px images, patch 4
IMAGE = (2, 3, 32, 32)


@dataclass
class Case:
    """name; build() -> a seeded, dropout-free model; embed(model, x) -> the tokens [B, P + M, C] entering the
    first layer; blocks(model) -> the layers; prefix: P; call(layer, tokens) -> the layer's output tokens."""
    name: str
    build: Callable[[], nn.Module]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    prefix: int
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda layer, tokens: layer(tokens)


def tensors(out) -> Dict[str, torch.Tensor]:
    """Every tensor of a model output: a tensor, a tuple, or a transformers ModelOutput (dict-like)."""
    if torch.is_tensor(out):
        return {"out": out}
    items = out.items() if hasattr(out, "items") else enumerate(out)
    return {str(key): value for key, value in items if torch.is_tensor(value)}


def loss_of(out) -> torch.Tensor:
    """A scalar with unequal weights per feature, over every output tensor."""
    total = 0.0
    for value in tensors(out).values():
        total = total + (value * torch.linspace(-1.0, 2.0, value.shape[-1])).sum()
    return total


def patched_and_plain(case: Case, layer: int = 1):
    """(patched model in train mode, unpatched copy with the same weights in train mode)."""
    model = case.build()
    plain = copy.deepcopy(model)
    toe.apply(model, SCHEDULE, layer=layer)
    return model.train(), plain.train()


def by_hand(case: Case, plain: nn.Module, x: torch.Tensor, layer: int, rates, k: int):
    """Tokens after the last layer, composed by hand on the unpatched model, and the kept positions."""
    tokens = case.embed(plain, x)
    layers = case.blocks(plain)
    for block in layers[:layer]:
        tokens = case.call(block, tokens)
    tokens, index = toe.token_expansion(tokens, rates, k, num_prefix_tokens=case.prefix)
    for block in layers[layer:]:
        tokens = case.call(block, tokens)
    return tokens, index


def last_layer_output(case: Case, model: nn.Module, x: torch.Tensor):
    """(model output, the tokens the last layer returned) of one forward."""
    seen = []
    handle = case.blocks(toe.unwrap_model(model))[-1].register_forward_hook(
        lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output))
    try:
        out = model(x)
    finally:
        handle.remove()
    return out, seen[0]


def check_last_stage_equals_plain(case: Case) -> None:
    model, plain = patched_and_plain(case)
    toe.set_epoch(model, SCHEDULE.epochs - 1)
    torch.manual_seed(1)
    x = torch.randn(*IMAGE)
    for mode in (True, False):
        model.train(mode), plain.train(mode)
        got, want = tensors(model(x)), tensors(plain(x))
        assert got.keys() == want.keys() and got
        for key in want:
            assert want[key].abs().sum() > 0, key  # a zero output would make the comparison empty
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def check_stage_one(case: Case, layer: int) -> None:
    """Stage 1: the last layer returns P + floor(r1 M) tokens, equal to the hand composition; backward runs."""
    model, plain = patched_and_plain(case, layer)
    toe.set_epoch(model, 0)
    torch.manual_seed(1)
    x = torch.randn(*IMAGE)
    out, features = last_layer_output(case, model, x)
    assert features.shape[1] == case.prefix + PATCHES // 2
    want, index = by_hand(case, plain, x, layer, toe.current_rates(model), SCHEDULE.k)
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(toe.last_index(model), index)
    # the features too: some heads start at zero (torchvision's), which would stop every gradient
    (loss_of(out) + loss_of(features)).backward()
    weights = [p for p in model.parameters() if p.grad is not None]
    assert weights and all(torch.isfinite(p.grad).all() for p in weights)
    first = case.blocks(model)[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())


def token_counts(case: Case, model: nn.Module) -> int:
    """Tokens the last layer returns on one training forward."""
    return last_layer_output(case, model, torch.randn(*IMAGE))[1].shape[1]


def check_set_epoch_deepcopy_state_dict_remove(case: Case) -> None:
    model, plain = patched_and_plain(case)
    counts = []
    for epoch in range(SCHEDULE.epochs):
        toe.set_epoch(model, epoch)
        counts.append(token_counts(case, model))
    assert counts == [case.prefix + n for n in (32, 48, 64)]
    toe.set_epoch(model, 0)
    ema = copy.deepcopy(model)
    toe.set_epoch(model, 2)
    assert token_counts(case, ema) == case.prefix + 32 and token_counts(case, model) == case.prefix + 64
    state, reference = model.state_dict(), plain.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[key], reference[key]) for key in reference)
    fresh = case.build()
    fresh.load_state_dict(state, strict=True)
    toe.set_epoch(model, 0)
    toe.remove(model)
    assert not toe.is_applied(model)
    assert all(len(block._forward_pre_hooks) == 0 for block in case.blocks(model))
    assert token_counts(case, model) == case.prefix + PATCHES


def check_ddp(case: Case, store: str) -> None:
    """DistributedDataParallel (gloo, one process): apply / set_epoch through the wrapper, train step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, plain = patched_and_plain(case)
    toe.remove(model)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        toe.apply(ddp, SCHEDULE)
        toe.set_epoch(ddp, 1)
        out, features = last_layer_output(case, ddp, torch.randn(*IMAGE))
        assert features.shape[1] == case.prefix + 48
        (loss_of(out) + loss_of(features)).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        dist.destroy_process_group()


def check_compile_one_graph_per_stage(case: Case) -> None:
    """torch.compile (eager backend): epochs 0-1 stage 1, 2-3 all tokens; one training graph per stage plus
    one for evaluation, no graph break, outputs equal to the eager patched model's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    schedule = Schedule(r1=0.5, ng=2, k=2, epochs=4)
    model = case.build()
    toe.apply(model, schedule)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(*IMAGE, generator=torch.Generator().manual_seed(1))
    graphs = []
    for epoch in range(schedule.epochs):
        toe.set_epoch(compiled, epoch)
        toe.set_epoch(twin, epoch)
        for mode in (True, False):
            compiled.train(mode), twin.train(mode)
            got, want = tensors(compiled(x)), tensors(twin(x))
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 2, 3, 3], graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
