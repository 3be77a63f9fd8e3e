"""steptime: interleaved, order-rotated timing with settling steps (against a fake clock), and the training
step it times (loss goes down, parameters move)."""
from __future__ import annotations

import time
from typing import Dict, List

import pytest
import torch

from runtime import steptime


class FakeClock:
    """A clock that only moves when a step says so: each step advances it by its own next duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steps(clock: FakeClock, durations: Dict[str, List[float]], calls: List[str]):
    def make(name: str):
        it = iter(durations[name])

        def step() -> None:
            calls.append(name)
            clock.now += next(it)
        return step
    return {name: make(name) for name in durations}


def test_time_interleaved_rotates_rounds_and_times_the_step_after_settling():
    clock, calls = FakeClock(), []
    # per call: settle, timed (settle=1), three rounds
    durations = {"a": [9, 1.0, 9, 2.0, 9, 3.0], "b": [9, 10.0, 9, 30.0, 9, 20.0], "c": [9, 5.0, 9, 5.0, 9, 8.0]}
    seen = []
    times = steptime.time_interleaved(_steps(clock, durations, calls), 3, settle=1, clock=clock,
                                      on_round=lambda r, t: seen.append((r, {k: list(v) for k, v in t.items()})))
    assert calls == ["a", "a", "b", "b", "c", "c",
                     "b", "b", "c", "c", "a", "a",
                     "c", "c", "a", "a", "b", "b"]
    assert times == {"a": [1.0, 2.0, 3.0], "b": [10.0, 30.0, 20.0], "c": [5.0, 5.0, 8.0]}
    assert steptime.medians(times) == {"a": 2.0, "b": 20.0, "c": 5.0}
    assert [r for r, _ in seen] == [0, 1, 2] and seen[0][1] == {"a": [1.0], "b": [10.0], "c": [5.0]}


def test_time_interleaved_without_settling_and_warm_up_order():
    clock, calls = FakeClock(), []
    steps = _steps(clock, {"x": [7.0, 1.0, 3.0], "y": [7.0, 4.0, 2.0]}, calls)
    steptime.warm_up(steps, rounds=1)
    times = steptime.time_interleaved(steps, 2, settle=0, clock=clock)
    assert calls == ["x", "y", "x", "y", "y", "x"]
    assert times == {"x": [1.0, 3.0], "y": [4.0, 2.0]}


def test_timed_uses_the_given_clock():
    clock = FakeClock()
    assert steptime.timed(lambda: setattr(clock, "now", clock.now + 0.25), clock=clock) == 0.25
    assert steptime.CLOCKS["cpu"] is time.process_time


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_make_step_trains_the_model(amp_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images, labels = torch.randn(16, 3, 4, 4), torch.arange(16) % 5

    def loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(images), labels))

    before = [p.detach().clone() for p in model.parameters()]
    start = loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = steptime.make_step(model, images, labels, optimizer=optimizer, amp_dtype=amp_dtype)
    for _ in range(20):
        step()
    assert loss() < 0.5 * start
    # the default optimizer (AdamW) moves every parameter too
    moved = [p.detach().clone() for p in model.parameters()]
    steptime.make_step(model, images, labels)()
    assert all(not torch.equal(a, b) for a, b in zip(before, moved))
    assert all(not torch.equal(a, p) for a, p in zip(moved, model.parameters()))
