"""Copies of a differentiable optimizer: `copy.deepcopy` and pickling, whose tensors with
history are detached (a graph can be neither deep-copied nor saved)."""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree

from ._shell import CopyShell
from ._state import GroupState

#: the optimizer type a copy keeps
_Copied = TypeVar("_Copied", bound=CopyShell)

#: attributes a copy does not take: caches worked out again on the next step
_NOT_COPIED = frozenset({"_bucket_cache", "_repeat"})


def held_tensors(opt: CopyShell) -> list[torch.Tensor]:
    """Every tensor `opt` holds: slots, options, state, reference parameters."""
    found = list(opt._reference)
    for group in opt.param_groups:
        for value in group.values():
            items = value if isinstance(value, (list, tuple)) else [value]
            found.extend(t for t in items if isinstance(t, torch.Tensor))
    for group_state in opt.state:
        for slot in group_state.values():
            found.extend(v for v in slot.values() if isinstance(v, torch.Tensor))
    return found


def deep_copy(opt: _Copied, memo: dict[int, Any]) -> _Copied:
    """`copy.deepcopy(opt)`: tensors with history become detached clones, as
    `copy.deepcopy(fmodel)` makes them (the functional model, when there is one, is copied too)."""
    for t in held_tensors(opt):
        if id(t) not in memo and not t.is_leaf:
            memo[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
    new = object.__new__(type(opt))
    memo[id(opt)] = new
    kept = {k: v for k, v in opt.__dict__.items() if k not in _NOT_COPIED}
    new.__dict__.update(copy.deepcopy(kept, memo))
    return new


def pickled_state(opt: CopyShell) -> dict[str, Any]:
    """What pickling saves of `opt`: tensors with history detached."""
    memo: dict[int, Any] = {}
    for t in held_tensors(opt):
        if not t.is_leaf:
            memo[id(t)] = t.detach().requires_grad_(t.requires_grad)
    state = {k: v for k, v in opt.__dict__.items() if k not in _NOT_COPIED}
    return _replaced(state, memo)  # type: ignore[no-any-return]


def _replaced(value: Any, memo: dict[int, Any]) -> Any:
    """`value` with the tensors found in `memo` replaced, through dicts, lists and tuples."""

    def swap(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return memo.get(id(x), x)
        if isinstance(x, GroupState):
            return x.map_tensors(lambda t: memo.get(id(t), t))
        if isinstance(x, defaultdict):  # a leaf to torch's pytree before torch 2.2
            return defaultdict(x.default_factory, {k: _replaced(v, memo) for k, v in x.items()})
        return x

    return pytree.tree_map(swap, value)
