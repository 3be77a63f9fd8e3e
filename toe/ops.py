"""The Token Expansion selection op (paper Sec. 3.3, Eq. 2-7): pure functions, vectorized over the batch.

Pipeline on the M patch tokens of x [B, N, C] (the first P prefix tokens pass through unchanged):

1. initialization (Eq. 2): n0 = floor(r0 M) seeds at evenly spaced positions (or random ones);
2. expansion (Eq. 3-6): for each stage m, add floor(r_m M) - floor(r_{m-1} M) tokens in k parallel
   steps, each step moving the unselected tokens farthest from their closest selected token;
3. merging (Eq. 7): every unselected token is averaged into its closest selected token.

The selection runs without autograd; only the gather and the merge carry gradients.

``compat="official"`` reproduces how the authors' released code (which produced the paper's numbers) departs
from these equations:

- seeds: the first floor(r0 M) positions i with i % int(1 // r0) == 0 (for r0 = 0.2 the float 1 // 0.2 is
  4.0, so the bottom rows of the image get no seed);
- counts: stage m adds int(M (r_m - r_{m-1})) tokens (136 instead of floor(0.7 M) = 137 for r1 = 0.4,
  M = 196), split into k steps as in Eq. 6;
- euclidean / manhattan: on L2-normalised tokens, a token's score is its *largest* distance to the selected
  set, each step adds the tokens with the smallest score, and merging sends each token to its *farthest*
  selected token. This is Eq. 4-7 with D replaced by -D, which is how it is implemented here. Cosine is
  as in the paper.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .schedule import count_tokens

DISTANCES = ("cosine", "euclidean", "manhattan")
INITS = ("spatial", "random")
COMPATS = ("none", "official")


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Distance matrix D(a, b) [B, Na, Nb] between token sets a [B, Na, C] and b [B, Nb, C] (Eq. 3).

    ``cosine`` is 1 - cos<a, b>; ``euclidean`` and ``manhattan`` are the L2 and L1 distances (Table 9).
    For cosine, pass rows that are already L2-normalized. Smaller always means closer.
    """
    if distance == "cosine":
        return 1.0 - torch.bmm(a, b.transpose(1, 2))
    if distance == "euclidean":
        return torch.cdist(a, b, p=2.0)
    if distance == "manhattan":
        return torch.cdist(a, b, p=1.0)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def split_steps(count: int, k: int) -> List[int]:
    """Sizes of the k parallel expansion steps for ``count`` tokens (Eq. 6): floor(count / k) each,
    the last step taking the remainder. Empty steps are dropped."""
    per_step = count // k
    sizes = [per_step] * (k - 1) + [count - per_step * (k - 1)]
    return [s for s in sizes if s > 0]


def expansion_plan(rates: Sequence[float], num_patches: int, k: int, expand: bool = True,
                   compat: str = "none") -> Tuple[int, List[int]]:
    """Seed count n0 and the sizes of every expansion step for cumulative ``rates`` [r0, ..., r_delta].

    ``compat="none"``: stage m adds floor(r_m M) - floor(r_{m-1} M) tokens, so the total is floor(r_delta M).
    ``compat="official"``: n0 = int(r0 M) and stage m adds int(M (r_m - r_{m-1})) tokens, truncated as the
    released code does. Each stage's count is split into k steps by :func:`split_steps` (Eq. 6).
    With ``expand=False`` (Table 7 ablation) the seed takes the r_delta share of the tokens directly.
    """
    if compat == "official":
        if not expand:
            return int(num_patches * rates[-1]), []
        stage_counts = [int(num_patches * (current - previous)) for previous, current in zip(rates, rates[1:])]
        n0 = int(num_patches * rates[0])
    else:
        counts = [count_tokens(r, num_patches) for r in rates]
        if not expand:
            return counts[-1], []
        stage_counts = [current - previous for previous, current in zip(counts, counts[1:])]
        n0 = counts[0]
    steps: List[int] = []
    for count in stage_counts:
        steps.extend(split_steps(count, k))
    return n0, steps


def official_seed_stride(seed_rate: float) -> int:
    """Spacing of the official code's spatial seeds: int(1 // r0), a float floor (1 // 0.2 == 4.0)."""
    return int(1 // seed_rate)


def _seed_positions(batch: int, num_patches: int, n0: int, init: str, device: torch.device,
                    generator: Optional[torch.Generator], seed_stride: Optional[int] = None) -> torch.Tensor:
    """Seed positions [B, n0] (Eq. 2); ``seed_stride`` gives the spatial seeds i * stride instead."""
    if init == "spatial":
        if seed_stride is not None:
            pos = torch.arange(n0, device=device) * seed_stride
        else:
            # (i * M) // n0 is exact integer arithmetic; a float step such as 1 // 0.2 == 4.0 would leave
            # the last rows of the image unseeded.
            pos = torch.arange(n0, device=device) * num_patches // n0
        return pos.unsqueeze(0).expand(batch, n0)
    if init == "random":
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
        return noise.argsort(dim=1)[:, :n0].to(device)
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, M, C] gathered at index [B, n] -> [B, n, C]."""
    batch, length, channels = x.shape
    # A flat index_select is several times faster than gather with an expanded index on CPU.
    flat = (index + torch.arange(batch, device=x.device).unsqueeze(1) * length).reshape(-1)
    return x.reshape(batch * length, channels).index_select(0, flat).view(batch, -1, channels)


def _mean_by_slot(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Average the tokens x [B, N, C] that share a slot [B, N] (values in 0..num_slots-1) -> [B, num_slots, C]."""
    batch, length, channels = x.shape
    flat = (slot + torch.arange(batch, device=x.device).unsqueeze(1) * num_slots).reshape(-1)
    # Half-precision sums of many tokens lose bits: accumulate in fp32.
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    sums = torch.zeros(batch * num_slots, channels, dtype=acc_dtype, device=x.device)
    sums = sums.index_add(0, flat, x.reshape(batch * length, channels).to(acc_dtype))
    # index_add rather than bincount: a fixed output shape keeps torch.compile graphs whole.
    counts = torch.zeros(batch * num_slots, dtype=acc_dtype, device=x.device)
    counts = counts.index_add(0, flat, torch.ones(flat.shape[0], dtype=acc_dtype, device=x.device))
    return (sums / counts.unsqueeze(1)).to(x.dtype).view(batch, num_slots, channels)


def _closest_of(tokens: torch.Tensor, candidates: torch.Tensor, distance: str,
                negate: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """For tokens [B, M, C]: distance to, and index of, the closest of candidates [B, c, C] -> ([B, M], [B, M]).

    ``negate`` measures with -D instead of D: the "closest" is then the farthest, at minus its distance.
    """
    if distance == "cosine":
        # max of the similarity rather than min of 1 - similarity: one pass less over [B, M, c].
        similarity, arg = torch.bmm(tokens, candidates.transpose(1, 2)).max(dim=-1)
        return 1.0 - similarity, arg
    if negate:
        farthest, arg = pairwise_distance(tokens, candidates, distance).max(dim=-1)
        return farthest.neg(), arg
    return pairwise_distance(tokens, candidates, distance).min(dim=-1)


def check_options(distance: str = "cosine", init: str = "spatial", compat: str = "none") -> None:
    """Raise a ValueError naming the first of ``distance``, ``init``, ``compat`` that is not a known choice."""
    for name, value, choices in (("distance", distance, DISTANCES), ("init", init, INITS),
                                 ("compat", compat, COMPATS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@torch.no_grad()
def select_tokens(patches: torch.Tensor, n0: int, steps: Sequence[int], *, distance: str = "cosine",
                  init: str = "spatial", track_closest: bool = True,
                  generator: Optional[torch.Generator] = None, compat: str = "none",
                  seed_stride: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Choose the kept patch tokens (Eq. 2-6) without autograd.

    Args:
        patches: patch tokens [B, M, C] (any float dtype; distances are computed in fp32, or fp64 for fp64).
        n0: number of seed tokens.
        steps: number of tokens added by each parallel expansion step, in order.
        track_closest: also return, for every token, the position of its closest kept token (Eq. 7's
            argmin), which merging needs.
        compat: ``official`` normalises the tokens for every distance and, for euclidean and manhattan,
            selects and merges with -D (see the module docstring).
        seed_stride: spatial seeds at i * seed_stride instead of (i * M) // n0.

    Returns:
        kept [B, n] positions in 0..M-1, seeds first then each step's additions, and
        closest [B, M] position of the kept token closest to each token (itself if kept), or None.
    """
    batch, num_patches, _ = patches.shape
    feats = patches.detach().to(torch.promote_types(patches.dtype, torch.float32))
    official = compat == "official"
    feats = F.normalize(feats, dim=-1) if distance == "cosine" or official else feats.contiguous()
    negate = official and distance != "cosine"
    kept = _seed_positions(batch, num_patches, n0, init, patches.device, generator, seed_stride)
    need_distances = bool(steps) or track_closest
    if not need_distances:
        return kept, None

    # min_dist[b, i]: distance of token i to its closest kept token (Eq. 4); -inf marks kept tokens so
    # that topk never picks them again. Each step only compares against the tokens it just added.
    min_dist = torch.full((batch, num_patches), float("inf"), dtype=feats.dtype, device=patches.device)
    closest = torch.zeros(batch, num_patches, dtype=torch.long, device=patches.device)
    new = kept
    parts = [kept]
    for step, size in enumerate(list(steps) + [None]):
        d_new, arg = _closest_of(feats, _gather_tokens(feats, new), distance, negate)
        closer = d_new < min_dist
        min_dist = torch.where(closer, d_new, min_dist)
        closest = torch.where(closer, new.gather(1, arg), closest)
        min_dist.scatter_(1, new, float("-inf"))
        closest.scatter_(1, new, new)
        if size is None:
            break
        new = min_dist.topk(size, dim=1).indices  # Eq. 6: the tokens farthest from everything kept
        parts.append(new)
        if step == len(steps) - 1 and not track_closest:
            break
    return torch.cat(parts, dim=1), (closest if track_closest else None)


def token_expansion(
    x: torch.Tensor,
    rates: Sequence[float],
    k: int,
    *,
    num_prefix_tokens: int = 1,
    distance: str = "cosine",
    init: str = "spatial",
    expand: bool = True,
    merge: bool = True,
    generator: Optional[torch.Generator] = None,
    return_assignment: bool = False,
    compat: str = "none",
) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Token Expansion on x [B, N, C]: initialization, expansion and merging (Eq. 2-7).

    Args:
        x: tokens [B, N, C]; the first P = ``num_prefix_tokens`` (CLS, distillation, registers) are
            always kept, unchanged, first and in order. The other M = N - P are patch tokens.
        rates: cumulative keep rates [r0, r1, ..., r_delta] of the current stage (``Schedule.rates``).
        k: repetition steps of the parallel expansion (Eq. 6).
        distance: ``cosine`` (1 - cos, the paper's default), ``euclidean`` or ``manhattan`` (Table 9).
        init: ``spatial`` seeds at evenly spaced positions (i * M) // n0 (official: i * int(1 // r0));
            ``random`` draws n0 positions per sample from ``generator`` (Table 7).
        expand: False seeds floor(r_delta M) tokens directly, with no expansion (Table 7); official mode
            seeds int(r_delta M) tokens at i * int(1 // r_delta).
        merge: False drops the unselected tokens instead of averaging them in (Table 7).
        return_assignment: also return, for every patch position, the slot of the output token that
            represents it.
        compat: ``none`` follows Eq. 2-7 exactly; ``official`` reproduces the released code's seeds,
            token counts and euclidean/manhattan rule (module docstring), batched the same way.

    Returns:
        tokens [B, P + n, C] with n = floor(r_delta M) (official: int(r0 M) + sum_m int(M (r_m - r_{m-1})));
        index [B, P + n] int64, the position in x of each kept token (0..P-1 first). With
        ``return_assignment``, also assignment [B, M] int64: the slot in ``tokens`` (in [P, P + n)) of the
        token that now carries patch i, its own slot if kept, the slot it was merged into otherwise, -1 if
        it was dropped (merge=False).
        When r_delta >= 1, x is returned unchanged with index = arange(N) and no work is done.
    """
    check_options(distance=distance, init=init, compat=compat)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(rates) < 1 or not all(0.0 < r for r in rates) or any(b < a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"rates must be positive and non-decreasing, got {list(rates)}")
    batch, num_tokens, channels = x.shape
    prefix = num_prefix_tokens
    num_patches = num_tokens - prefix
    if prefix < 0 or num_patches < 1:
        raise ValueError(f"num_prefix_tokens must be in [0, N={num_tokens}), got {prefix}")

    if rates[-1] >= 1.0:
        index = torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
        if return_assignment:
            return x, index, index[:, prefix:]
        return x, index

    n0, steps = expansion_plan(rates, num_patches, k, expand, compat)
    if n0 < 1:
        raise ValueError(f"r0={rates[0]} keeps no token out of {num_patches} patches; raise r0")
    seed_stride = official_seed_stride(rates[0] if expand else rates[-1]) if compat == "official" else None
    patches = x[:, prefix:]
    kept, closest = select_tokens(patches, n0, steps, distance=distance, init=init, track_closest=merge,
                                  generator=generator, compat=compat, seed_stride=seed_stride)
    num_kept = kept.shape[1]

    # slot_of[b, p]: output slot (prefix included) of kept patch position p; -1 elsewhere.
    slot_of = torch.full((batch, num_patches), -1, dtype=torch.long, device=x.device)
    slot_of.scatter_(1, kept, torch.arange(prefix, prefix + num_kept, device=x.device).expand(batch, num_kept))
    prefix_index = torch.arange(prefix, device=x.device).expand(batch, prefix)
    index = torch.cat([prefix_index, kept + prefix], dim=1)

    if merge:
        # Eq. 7: mean over {A_j} and every B_i whose closest kept token is A_j, as one index_add over all
        # N tokens (each prefix token is its own group of one, so it passes through unchanged).
        assign = slot_of.gather(1, closest)
        tokens = _mean_by_slot(x, torch.cat([prefix_index, assign], dim=1), prefix + num_kept)
    else:
        assign = slot_of
        tokens = _gather_tokens(x, index)
    if return_assignment:
        return tokens, index, assign
    return tokens, index
