"""RASampler and DistributedEvalSampler properties (samplers.py)."""
from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samplers as S  # noqa: E402
from samplers import DistributedEvalSampler, RASampler  # noqa: E402


def ra_epoch(n: int, world: int, repeats: int = 3, epoch: int = 0, shuffle: bool = True, seed: int = 0):
    per_rank = []
    for r in range(world):
        s = RASampler(range(n), num_replicas=world, rank=r, shuffle=shuffle, num_repeats=repeats, seed=seed)
        s.set_epoch(epoch)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    return per_rank


CASES = [(100, 4, 3), (100, 2, 3), (37, 8, 3), (1000, 8, 3), (10, 3, 3), (64, 4, 2), (50, 5, 1)]


@pytest.mark.parametrize("n, world, repeats", CASES)
def test_ra_lengths_copies_and_ranks(n, world, repeats):
    ranks = ra_epoch(n, world, repeats)
    per_rank = math.ceil(n / world)
    assert all(len(r) == per_rank for r in ranks)  # equal lengths = an ordinary distributed epoch
    allidx = [i for r in ranks for i in r]
    assert all(0 <= i < n for i in allidx)
    counts = Counter(allidx)
    # each used image appears `repeats` times, except at most one image cut off at the epoch's end
    assert max(counts.values()) <= repeats
    assert sum(1 for c in counts.values() if c != repeats) <= 1
    assert len(counts) == math.ceil(per_rank * world / repeats)
    # copies of one image go to different ranks, in the same or the next step
    where: dict[int, list[tuple[int, int]]] = {}
    for r, idx in enumerate(ranks):
        for pos, i in enumerate(idx):
            where.setdefault(i, []).append((r, pos))
    for i, places in where.items():
        assert len({r for r, _ in places}) == min(len(places), world)
        assert max(p for _, p in places) - min(p for _, p in places) <= math.ceil(repeats / world)


def test_ra_world_size_one_keeps_copies_together():
    (only,) = ra_epoch(10, 1, 3)
    assert len(only) == 10
    # the stream is a permutation with every index written three times in a row
    firsts = only[::3]
    assert len(set(firsts)) == 4
    assert only[:9] == [i for i in firsts[:3] for _ in range(3)] and only[9] == firsts[3]
    (plain,) = ra_epoch(7, 1, 1)
    assert sorted(plain) == list(range(7))  # one repeat = an ordinary shuffle


@pytest.mark.parametrize("n, world, repeats", [(1, 8, 3), (2, 4, 3), (5, 4, 3), (3, 3, 3), (2, 1, 3)])
def test_ra_tiny_datasets_give_every_rank_work(n, world, repeats):
    ranks = ra_epoch(n, world, repeats)
    assert all(len(r) == math.ceil(n / world) >= 1 for r in ranks)
    got = {i for r in ranks for i in r}
    assert got <= set(range(n)) and len(got) == min(n, math.ceil(len(ranks[0]) * world / repeats))


def test_ra_determinism_epochs_and_coverage():
    a = ra_epoch(90, 3, 3, epoch=5)
    b = ra_epoch(90, 3, 3, epoch=5)
    c = ra_epoch(90, 3, 3, epoch=6)
    assert a == b and a != c
    assert ra_epoch(90, 3, 3, epoch=5, seed=1) != a
    s = RASampler(range(90), num_replicas=3, rank=0)
    first = list(s)
    assert list(s) == first  # iterating again without set_epoch repeats the epoch
    # each epoch uses a third of the images; every aligned cycle of 3 epochs uses all of them
    for cycle in range(3):
        seen = Counter(i for ep in range(3 * cycle, 3 * cycle + 3) for r in ra_epoch(90, 3, 3, epoch=ep) for i in r)
        assert set(seen) == set(range(90)) and set(seen.values()) == {3}
    # uneven sizes: windows wrap around, still covering everything in a cycle
    assert {i for ep in range(3) for r in ra_epoch(100, 4, 3, epoch=ep) for i in r} == set(range(100))
    # no shuffle: the stream is 0,0,0,1,1,1,... dealt round-robin to the ranks
    r0, r1 = ra_epoch(6, 2, 3, shuffle=False)
    assert r0 == [0, 0, 1] and r1 == [0, 1, 1]


def test_ra_with_dataloader_and_bad_arguments():
    s = RASampler(list(range(20)), num_replicas=2, rank=1, num_repeats=2)
    batches = list(DataLoader(list(range(20)), batch_size=4, sampler=s))
    assert sum(len(b) for b in batches) == 10
    with pytest.raises(ValueError, match="rank"):
        RASampler(range(5), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_repeats"):
        RASampler(range(5), num_replicas=2, rank=0, num_repeats=0)
    assert list(RASampler([], num_replicas=2, rank=0)) == []


@pytest.mark.parametrize("n, world", [(10, 3), (9, 3), (2, 4), (0, 2), (1, 1), (1001, 8)])
def test_eval_sampler_is_an_exact_partition(n, world):
    parts = [list(DistributedEvalSampler(range(n), num_replicas=world, rank=r)) for r in range(world)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # every index exactly once, no padding
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= (1 if n else 0)
    assert lens == [len(DistributedEvalSampler(range(n), num_replicas=world, rank=r)) for r in range(world)]
    assert all(p == sorted(p) for p in parts)


def test_defaults_follow_torch_distributed(monkeypatch):
    assert (DistributedEvalSampler(range(5)).num_replicas, DistributedEvalSampler(range(5)).rank) == (1, 0)
    assert len(RASampler(range(5))) == 5
    monkeypatch.setattr(S.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(S.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(S.dist, "get_rank", lambda group=None: 2)
    ev = DistributedEvalSampler(range(10))
    assert (ev.num_replicas, ev.rank, list(ev)) == (4, 2, [2, 6])
    ra = RASampler(range(10))
    assert (ra.num_replicas, ra.rank, len(ra)) == (4, 2, 3)
    assert torch.distributed.is_available()
