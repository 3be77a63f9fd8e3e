"""Per-token side inputs that must follow the kept tokens: rotary embeddings (one row per patch token),
attention masks and relative-position biases (one entry per pair of tokens).

Both gathers follow the broadcasting rule the attention applies to them (trailing dimensions aligned with
q [B, H, N, D] or the logits [B, H, N, N]), so a side input of any accepted shape, with or without a batch
dimension, comes out as [B, h, n, D] or [B, h, n, n] (h is 1 or the heads dimension it had).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import SideInputHook


def _as_4d(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """t [..., L, X] with at most two leading dims -> [B, h, L, X] (prepended ones, then the batch expanded)."""
    if not 2 <= t.dim() <= 4:
        raise RuntimeError(f"ToE: cannot gather {what} of shape {tuple(t.shape)} (expected 2 to 4 dims)")
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if t.shape[0] not in (1, batch):
        raise RuntimeError(f"ToE: {what} has batch {t.shape[0]}, the tokens have {batch}")
    return t.expand(batch, -1, -1, -1)


def gather_token_rows(table: torch.Tensor, positions: torch.Tensor, what: str = "side input") -> torch.Tensor:
    """Rows of a per-token table at the kept positions.

    Args:
        table: [L, D], [h, L, D] or [B | 1, h, L, D] (e.g. rotary sin/cos rows, one per patch token).
        positions: [B, n] int64 in 0..L-1.

    Returns:
        [B, h, n, D] (h = 1 for a 2-d table): row j of sample b is ``table[..., positions[b, j], :]``.
    """
    rows = _as_4d(table, positions.shape[0], what)
    batch, heads, _, dim = rows.shape
    index = positions[:, None, :, None].expand(batch, heads, positions.shape[1], dim)
    return rows.gather(2, index)


def gather_token_pairs(table: torch.Tensor, positions: torch.Tensor, what: str = "side input") -> torch.Tensor:
    """Entries of a pairwise table (attention mask or bias) between kept positions.

    Args:
        table: [L, L], [h, L, L] or [B | 1, h, L, L].
        positions: [B, n] int64 in 0..L-1.

    Returns:
        [B, h, n, n]: entry (i, j) of sample b is ``table[..., positions[b, i], positions[b, j]]``.
    """
    pairs = _as_4d(table, positions.shape[0], what)
    batch, heads, _, length = pairs.shape
    count = positions.shape[1]
    rows = pairs.gather(2, positions[:, None, :, None].expand(batch, heads, count, length))
    return rows.gather(3, positions[:, None, None, :].expand(batch, heads, count, count))


def parameter_positions(block: nn.Module, names: Sequence[str]) -> Dict[str, int]:
    """Positional index (0 = the hidden states) of each of ``names`` in ``block.forward``'s signature; a name
    the block does not take is left out (it can then only arrive as a keyword, which it never will)."""
    params = [p.name for p in inspect.signature(block.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {name: params.index(name) for name in names if name in params}


class GatherSideInputs(SideInputHook):
    """Forward pre-hook on one block from ``layer`` on: replaces its side inputs by their kept-token versions.

    ``rows`` names per-patch-token tables (rotary embeddings: prefix tokens have none, so the rows are the
    kept *patch* positions); ``pairs`` names per-pair tables over the whole sequence, prefix included
    (attention masks, relative-position biases). A side input may arrive positionally or as a keyword;
    ``positions`` maps a name to its positional index. A block called with ``is_causal=True`` is refused at
    run time: causality among kept tokens in selection order is not the model's.
    """

    def __init__(self, state: Any, positions: Dict[str, int], rows: Sequence[str] = (),
                 pairs: Sequence[str] = ()) -> None:
        super().__init__(state)
        self.positions = dict(positions)
        self.rows = tuple(rows)
        self.pairs = tuple(pairs)

    def _get(self, args: tuple, kwargs: Dict[str, Any], name: str) -> Tuple[Optional[int], Any]:
        """(positional index or None, value) of side input ``name``; value None when not given."""
        where = self.positions.get(name)
        if where is not None and where < len(args):
            return where, args[where]
        return None, kwargs.get(name)

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        index = self.state.last_index
        if index is None:
            return None
        if self._get(args, kwargs, "is_causal")[1]:
            raise RuntimeError("ToE cannot reduce tokens under is_causal=True (causal order among the kept "
                               "tokens is not the model's); call the model without it")
        prefix = self.state.num_prefix_tokens
        num_patches = self.state.last_assignment.shape[1]
        args, kwargs, changed = list(args), dict(kwargs), False
        for name in self.rows + self.pairs:
            where, value = self._get(args, kwargs, name)
            if not torch.is_tensor(value):
                continue
            length = num_patches if name in self.rows else prefix + num_patches
            if value.shape[-2] != length:
                # a table for another sequence would be gathered silently wrong
                raise RuntimeError(f"ToE: {name} has {value.shape[-2]} rows, the sequence before the "
                                   f"reduction had {length} {'patch ' if name in self.rows else ''}tokens")
            if name in self.rows:
                value = gather_token_rows(value, index[:, prefix:] - prefix, name)
            else:
                value = gather_token_pairs(value, index, name)
            if where is None:
                kwargs[name] = value
            else:
                args[where] = value
            changed = True
        return (tuple(args), kwargs) if changed else None


def attach_gathers(blocks: Sequence[nn.Module], layer: int, state: Any, rows: Sequence[str] = (),
                   pairs: Sequence[str] = ()) -> list:
    """Register a :class:`GatherSideInputs` on every block from ``layer`` on; returns the hooks."""
    hooks = []
    for block in list(blocks)[layer:]:
        positions = parameter_positions(block, tuple(rows) + tuple(pairs) + ("is_causal",))
        hook = GatherSideInputs(state, positions, rows, pairs)
        block.register_forward_pre_hook(hook, with_kwargs=True)
        hooks.append(hook)
    return hooks
