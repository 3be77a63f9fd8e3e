"""toe.ops against a naive per-sample, per-token implementation of the paper's Eq. 2-7."""
import math
import zlib

import pytest
import torch

from toe.ops import expansion_plan, split_steps, token_expansion


def naive_distance(a, b, distance):
    """Distance between two single tokens, straight from the definitions."""
    if distance == "cosine":
        return 1.0 - float(torch.dot(a, b) / (a.norm() * b.norm()))
    if distance == "euclidean":
        return float(((a - b) ** 2).sum().sqrt())
    return float((a - b).abs().sum())


def naive_floor(rate, m):
    return math.floor(rate * m + 1e-6)


def naive_toe(x, rates, k, prefix, distance, expand=True, merge=True, seeds=None):
    """One sample x [N, C]; returns (kept patch positions in selection order, merged kept tokens [n, C])."""
    patches = x[prefix:].double()
    m = patches.shape[0]
    counts = [naive_floor(r, m) for r in rates]
    if not expand:
        counts = [counts[-1]]
    n0 = counts[0]
    selected = list(seeds) if seeds is not None else [(i * m) // n0 for i in range(n0)]
    for prev, cur in zip(counts, counts[1:]):
        total = cur - prev
        sizes = [total // k] * (k - 1) + [total - (total // k) * (k - 1)]
        for size in sizes:
            if size == 0:
                continue
            unselected = [i for i in range(m) if i not in selected]
            # Eq. 3-4: distance of each unselected token to its closest selected token.
            d = {i: min(naive_distance(patches[i], patches[j], distance) for j in selected) for i in unselected}
            # Eq. 6: the `size` farthest ones join the selected set.
            selected += sorted(unselected, key=lambda i: -d[i])[:size]
    groups = {j: [patches[j]] for j in selected}
    if merge:
        for i in range(m):
            if i in selected:
                continue
            closest = min(selected, key=lambda j: naive_distance(patches[i], patches[j], distance))
            groups[closest].append(patches[i])  # Eq. 7
    merged = torch.stack([torch.stack(groups[j]).mean(0) for j in selected])
    return selected, merged


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("rates", [[0.25, 0.5], [0.25, 0.5, 0.75], [0.2, 0.4, 0.7]])
@pytest.mark.parametrize("prefix", [1, 2])
def test_matches_naive_reference(distance, k, rates, prefix):
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), this seed must not.
    torch.manual_seed(zlib.crc32(f"{distance} {k} {rates} {prefix}".encode()))
    x = torch.randn(3, prefix + 30, 8)
    tokens, index, assign = token_expansion(x, rates, k, num_prefix_tokens=prefix, distance=distance,
                                            return_assignment=True)
    n = naive_floor(rates[-1], 30)
    assert tokens.shape == (3, prefix + n, 8) and index.shape == (3, prefix + n)
    assert index.dtype == torch.int64
    for b in range(3):
        selected, merged = naive_toe(x[b], rates, k, prefix, distance)
        assert index[b, :prefix].tolist() == list(range(prefix))
        assert torch.equal(tokens[b, :prefix], x[b, :prefix])
        kept = (index[b, prefix:] - prefix).tolist()
        assert set(kept) == set(selected)
        # Seeds come first, in order.
        n0 = naive_floor(rates[0], 30)
        assert kept[:n0] == selected[:n0]
        order = [kept.index(j) for j in selected]
        torch.testing.assert_close(tokens[b, prefix:][order].double(), merged, rtol=1e-5, atol=1e-5)
        # The assignment points every patch at the slot whose merged token contains it.
        for i in range(30):
            slot = int(assign[b, i])
            assert prefix <= slot < prefix + n
            if i in selected:
                assert int(index[b, slot]) == i + prefix


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_no_merge_and_no_expand_ablations(distance):
    torch.manual_seed(1)
    x = torch.randn(2, 1 + 40, 6)
    rates = [0.2, 0.45, 0.7]
    tokens, index, assign = token_expansion(x, rates, 2, distance=distance, merge=False, return_assignment=True)
    for b in range(2):
        selected, _ = naive_toe(x[b], rates, 2, 1, distance, merge=False)
        kept = (index[b, 1:] - 1).tolist()
        assert set(kept) == set(selected)
        # Dropped tokens are gathered, not averaged; dropped positions get -1.
        assert torch.equal(tokens[b], x[b, index[b]])
        assert sorted(i for i in range(40) if assign[b, i] < 0) == sorted(set(range(40)) - set(selected))
    # expand=False: the seed takes floor(r_delta M) evenly spaced tokens directly.
    tokens, index = token_expansion(x, rates, 2, distance=distance, expand=False)
    n = naive_floor(0.7, 40)
    assert index[0, 1:].tolist() == [1 + (i * 40) // n for i in range(n)]
    selected, merged = naive_toe(x[0], rates, 2, 1, distance, expand=False)
    torch.testing.assert_close(tokens[0, 1:].double(), merged, rtol=1e-5, atol=1e-5)


def test_spatial_seed_covers_whole_grid():
    # r0 = 0.2 on 196 patches: 39 seeds spread to the last rows (a float step 1 // 0.2 == 4 would stop at 152).
    x = torch.randn(1, 197, 4)
    _, index = token_expansion(x, [0.2], 1, expand=False, merge=False)
    seeds = (index[0, 1:] - 1).tolist()
    assert len(seeds) == 39 and seeds[0] == 0 and seeds[-1] == (38 * 196) // 39 >= 185
    assert seeds == [(i * 196) // 39 for i in range(39)]


def test_random_init_uses_generator():
    x = torch.randn(4, 1 + 49, 8)
    out = [token_expansion(x, [0.2, 0.4], 2, init="random", generator=torch.Generator().manual_seed(s))[1]
           for s in (0, 0, 1)]
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    # Random seeds differ per sample and the expansion still completes from them.
    seeds = out[0][:, 1:1 + 9]
    assert not all(torch.equal(seeds[0], seeds[b]) for b in range(1, 4))
    for b in range(4):
        selected, _ = naive_toe(x[b], [0.2, 0.4], 2, 1, "cosine", seeds=(seeds[b] - 1).tolist())
        assert set((out[0][b, 1:] - 1).tolist()) == set(selected)


def test_rounding_safe_counts():
    # 0.7 - 0.4 = 0.29999999999999993: floor must still give 3 of 10 and 30 of 100.
    assert expansion_plan([0.1, 0.7 - 0.4], 10, 1) == (1, [2])
    assert expansion_plan([0.1, 0.7 - 0.4], 100, 1) == (10, [20])
    assert split_steps(7, 3) == [2, 2, 3] and split_steps(2, 3) == [2] and split_steps(0, 2) == []


def test_rate_one_is_identity():
    x = torch.randn(2, 17, 4)
    tokens, index, assign = token_expansion(x, [0.5, 1.0], 2, return_assignment=True)
    assert tokens is x
    assert index.tolist() == [list(range(17))] * 2 and assign.tolist() == [list(range(1, 17))] * 2


def test_gradients_reach_every_token():
    x = torch.randn(2, 1 + 36, 8, requires_grad=True)
    tokens, _ = token_expansion(x, [0.25, 0.5], 2)
    tokens.pow(2).sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()
    # Without merging, dropped tokens get no gradient, kept ones do.
    x.grad = None
    tokens, index = token_expansion(x, [0.25, 0.5], 2, merge=False)
    tokens.sum().backward()
    assert int((x.grad.abs().sum(-1) > 0).sum()) == index.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_fp32(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 64, 16).to(dtype)
    tokens, index = token_expansion(x, [0.25, 0.5, 0.75], 2)
    ref_tokens, ref_index = token_expansion(x.float(), [0.25, 0.5, 0.75], 2)
    assert tokens.dtype == dtype
    assert torch.equal(index, ref_index)  # similarities are computed in fp32 either way
    torch.testing.assert_close(tokens.float(), ref_tokens, rtol=1e-2, atol=1e-2)


def test_bad_arguments_name_the_argument():
    x = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="distance"):
        token_expansion(x, [0.5], 1, distance="cos")
    with pytest.raises(ValueError, match="init"):
        token_expansion(x, [0.5], 1, init="grid")
    with pytest.raises(ValueError, match="k must"):
        token_expansion(x, [0.5], 0)
    with pytest.raises(ValueError, match="rates"):
        token_expansion(x, [0.5, 0.3], 1)
    with pytest.raises(ValueError, match="r0"):
        token_expansion(x, [0.01, 0.5], 1)
