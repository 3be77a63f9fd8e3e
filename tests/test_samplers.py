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


# ------------------------------------------------------------------ against a naive reference of RA
def _stream(ranks):
    """Rebuild the global index stream from per-rank lists: rank r's j-th index sits at position j * W + r."""
    world = len(ranks)
    stream = [None] * (len(ranks[0]) * world)
    for r, idx in enumerate(ranks):
        for j, i in enumerate(idx):
            stream[j * world + r] = i
    return stream


def _blocks(stream, repeats):
    """The images of a repeated-augmentation stream: it must be [a0]*R + [a1]*R + ... (the last block may be
    cut off by the epoch's end); returns [a0, a1, ...]."""
    images = stream[::repeats]
    naive = [a for a in images for _ in range(repeats)][:len(stream)]
    assert stream == naive, "the stream is not each image written num_repeats times in a row"
    return images


@pytest.mark.parametrize("n, world, repeats", [(100, 4, 3), (37, 8, 3), (90, 3, 3), (64, 4, 2), (50, 5, 1),
                                               (30, 2, 4)])
def test_ra_matches_naive_repeated_augmentation(n, world, repeats):
    """Per epoch: the ranks' shards are disjoint slices (rank r: positions r, r+W, ...) of one stream in which
    every image is written R times in a row; distinct images within an epoch; over a cycle of R epochs the
    images are consecutive windows of one permutation of all N, wrapping around."""
    per_rank = math.ceil(n / world)
    for cycle in range(2):
        seq = []
        for epoch in range(cycle * repeats, cycle * repeats + repeats):
            ranks = ra_epoch(n, world, repeats, epoch=epoch, seed=3)
            images = _blocks(_stream(ranks), repeats)
            assert len(images) == math.ceil(per_rank * world / repeats)
            assert len(set(images)) == len(images)  # an epoch never uses an image in two blocks
            # each used image appears `repeats` times over the ranks, the cut-off last one fewer
            counts = Counter(i for r in ranks for i in r)
            assert [counts[a] for a in images[:-1]] == [repeats] * (len(images) - 1)
            assert 1 <= counts[images[-1]] <= repeats
            seq += images
        # the cycle's R windows continue one permutation of range(N), wrapping around after N
        assert sorted(seq[:n]) == list(range(n))
        assert all(seq[k] == seq[k - n] for k in range(n, len(seq)))


def test_ra_depends_only_on_seed_and_epoch_not_on_global_rng():
    def draw(seed, epoch):
        s = RASampler(range(50), num_replicas=2, rank=1, num_repeats=3, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    torch.manual_seed(0)
    a = draw(5, 4)
    torch.manual_seed(123)
    torch.rand(10)
    assert draw(5, 4) == a  # the global generator plays no part (ranks must agree without sharing it)
    assert draw(5, 3) != a and draw(6, 4) != a
    # epochs of one cycle share the permutation, the next cycle draws a new one
    assert _blocks(_stream(ra_epoch(50, 2, 3, epoch=3, seed=5)), 3)[:3] != \
        _blocks(_stream(ra_epoch(50, 2, 3, epoch=0, seed=5)), 3)[:3]


def test_ra_copies_of_an_image_meet_in_one_step_on_different_ranks():
    """With R <= W and a batch size B, the R copies of an image land in the same step (or the next) of R
    different ranks: the point of repeated augmentation is one image seen several ways per update."""
    world, repeats, batch = 4, 2, 5
    ranks = [list(DataLoader(range(80), batch_size=batch, sampler=RASampler(range(80), num_replicas=world, rank=r,
                                                                            num_repeats=repeats, seed=1)))
             for r in range(world)]
    where = {}
    for r, batches in enumerate(ranks):
        for step, b in enumerate(batches):
            for i in b.tolist():
                where.setdefault(i, []).append((r, step))
    for i, places in where.items():
        assert len(places) == repeats
        assert len({r for r, _ in places}) == repeats
        assert max(s for _, s in places) - min(s for _, s in places) <= 1


def test_eval_sampler_shards_give_the_single_process_metrics():
    """Evaluating each rank's shard and summing counts gives the one-process numbers (nothing padded or lost)."""
    import engine

    torch.manual_seed(0)
    n, world = 23, 3
    x, y = torch.randn(n, 3, 4, 4), torch.randint(0, 6, (n,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 6))
    data = torch.utils.data.TensorDataset(x, y)
    hits = loss = count = 0.0
    for r in range(world):
        sampler = DistributedEvalSampler(data, num_replicas=world, rank=r)
        res = engine.evaluate(DataLoader(data, batch_size=4, sampler=sampler), model, torch.device("cpu"))
        hits += res["acc1"] * res["n"] / 100
        loss += res["loss"] * res["n"]
        count += res["n"]
    with torch.no_grad():
        logits = model(x)
    assert count == n
    assert round(hits) == int((logits.argmax(1) == y).sum())
    assert loss / n == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_samplers_read_a_real_process_group(tmp_path):
    """Inside an initialised (one-process gloo) group the defaults come from torch.distributed, and a rank
    outside that world is refused."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ev, ra = DistributedEvalSampler(range(7)), RASampler(range(7), num_repeats=1, shuffle=False)
        assert (ev.num_replicas, ev.rank, list(ev)) == (1, 0, list(range(7)))
        assert (ra.num_replicas, ra.rank, list(ra)) == (1, 0, list(range(7)))
        with pytest.raises(ValueError, match="rank"):
            DistributedEvalSampler(range(7), rank=1)
    finally:
        dist.destroy_process_group()
