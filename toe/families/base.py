"""What a model family tells the ToE patch: where the blocks are, how many prefix tokens lead the
sequence, how a block receives its hidden states, and which per-token side inputs (rotary embeddings,
relative-position biases) must follow the kept tokens.

A family is one small subclass of :class:`Family` in its own module; :mod:`toe.families` lists them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class Family(ABC):
    """Adapter between one family of ViT implementations and :func:`toe.apply`.

    Subclasses set ``name`` / ``description`` and override :meth:`matches`, :meth:`blocks` and
    :meth:`num_prefix_tokens`; families whose blocks take per-token side inputs override
    :meth:`attach_side_inputs`.
    """

    name: str = "family"
    #: one line for the refusal message and the README table, e.g. "timm VisionTransformer (model.blocks)"
    description: str = ""
    #: keyword under which a block receives its hidden states [B, N, C] when they are not positional
    hidden_keyword: str = "x"

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` (already unwrapped) belongs to this family, judged by structure."""

    def refusal(self, model: nn.Module) -> Optional[str]:
        """Why a model of this family cannot be patched exactly (None when it can)."""
        return None

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The sequence of transformer blocks, in forward order (default: timm's ``model.blocks``)."""
        return model.blocks

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """P: tokens (class, distillation, registers) that lead the sequence and are always kept
        (default: timm's ``model.num_prefix_tokens``)."""
        return int(model.num_prefix_tokens)

    def read_hidden(self, args: tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
        """The hidden states [B, N, C] a block is called with, positional or by keyword."""
        if args:
            return args[0]
        if self.hidden_keyword in kwargs:
            return kwargs[self.hidden_keyword]
        raise RuntimeError(f"ToE ({self.name}): the block received no hidden states, neither positionally "
                           f"nor as {self.hidden_keyword!r}")

    def write_hidden(self, args: tuple, kwargs: Dict[str, Any], tokens: torch.Tensor) -> Tuple[tuple, dict]:
        """``(args, kwargs)`` with the hidden states replaced by ``tokens``, where the caller put them."""
        if args:
            return (tokens,) + tuple(args[1:]), kwargs
        return args, {**kwargs, self.hidden_keyword: tokens}

    def attach_side_inputs(self, model: nn.Module, layer: int, state: Any) -> List[Any]:
        """Register what makes per-token side inputs follow the kept tokens in blocks ``layer..``.

        ``state`` is the :class:`toe.patch.ToEHook`; its ``last_index`` [B, P + n] holds the positions
        kept in the current forward (None when ToE did not reduce). Returns the registered hook objects,
        which must subclass :class:`SideInputHook` so :func:`toe.remove` finds them. Default: none.
        """
        return []


class SideInputHook(ABC):
    """Base of the extra forward pre-hooks a family registers (found and removed by :func:`toe.remove`).

    Registered ``with_kwargs=True``: called as ``hook(module, args, kwargs)``, returns ``(args, kwargs)``
    or None. It reads the selection from ``self.state.last_index``.
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    @abstractmethod
    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        """The rewritten ``(args, kwargs)`` of ``module``'s call, or None to leave them."""


def has_int(model: nn.Module, attribute: str) -> bool:
    """Whether ``model.<attribute>`` is a plain int (not a bool, not a module)."""
    value = getattr(model, attribute, None)
    return isinstance(value, int) and not isinstance(value, bool)


class MethodOverride:
    """Base of the per-instance method overrides a family installs where no hook can reach (a quantity an
    attention module computes from its own buffers, such as BEiT's relative-position bias).

    Stored as an instance attribute of ``module`` under ``name``, it shadows the class's method; it holds
    the module and the ToE state as plain attributes, so ``copy.deepcopy`` gives a copy its own override
    bound to the copied module and hook. :func:`toe.remove` deletes it, which restores the class method.
    """

    def __init__(self, state: Any, module: nn.Module, name: str) -> None:
        self.state = state
        self.module = module
        self.name = name

    def original(self, *args: Any, **kwargs: Any) -> Any:
        """The shadowed method of the module's class, called on the module."""
        return getattr(type(self.module), self.name)(self.module, *args, **kwargs)

    def install(self) -> "MethodOverride":
        object.__setattr__(self.module, self.name, self)
        return self


def is_class(model: nn.Module, module_name: str, class_name: str) -> bool:
    """Whether ``model`` is an instance of class ``module_name.class_name`` or of a subclass, checked by
    name so that the package defining it is never imported here."""
    return any(c.__module__ == module_name and c.__name__ == class_name for c in type(model).__mro__)
