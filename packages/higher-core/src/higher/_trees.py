"""Nested states (a rule's NamedTuple of lists of tensors) as a flat list of tensors and back.

`torch.func.vmap` and `torch.compile`'s loop operators take tensors; an optimizer's state also
holds step counts and None. `flatten` takes the tensors out (in a fixed order) and leaves the
rest in a spec that `unflatten` fills again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


class _Leaf:
    """Where a tensor was."""

    def __repr__(self) -> str:
        return "*"


LEAF = _Leaf()


def flatten(tree: Any) -> tuple[list[torch.Tensor], Any]:
    """The tensors of `tree` (NamedTuples, tuples, lists and dicts of them), and its spec."""
    leaves: list[torch.Tensor] = []
    return leaves, _walk(tree, leaves)


def _walk(x: Any, leaves: list[torch.Tensor]) -> Any:
    # A module function, not a closure over `leaves`: a recursive closure is a reference
    # cycle, and it would keep the tensors alive until the cycle collector runs.
    if isinstance(x, torch.Tensor):
        leaves.append(x)
        return LEAF
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*[_walk(v, leaves) for v in x])
    if isinstance(x, (list, tuple)):
        return type(x)(_walk(v, leaves) for v in x)
    if isinstance(x, dict):
        return {k: _walk(v, leaves) for k, v in x.items()}
    return x


def unflatten(spec: Any, leaves: list[torch.Tensor]) -> Any:
    """The tree `flatten` took `leaves` from (the same order)."""
    it = iter(leaves)
    tree = _build(spec, it)
    if next(it, None) is not None:
        raise ValueError("more leaves than the spec has places")
    return tree


def _build(spec: Any, it: Iterator[torch.Tensor]) -> Any:
    if spec is LEAF:
        return next(it)
    if isinstance(spec, tuple) and hasattr(spec, "_fields"):
        return type(spec)(*[_build(v, it) for v in spec])
    if isinstance(spec, (list, tuple)):
        return type(spec)(_build(v, it) for v in spec)
    if isinstance(spec, dict):
        return {k: _build(v, it) for k, v in spec.items()}
    return spec


def map_fields(state: Any, fn: Callable[[str, Any], Any]) -> Any:
    """A rule state (NamedTuple) with each field's value replaced by `fn(name, value)`."""
    return type(state)(*[fn(name, value) for name, value in zip(state._fields, state)])


def split_fields(states: list[Any], names: frozenset[str]) -> tuple[list[Any], list[Any]]:
    """Each rule state (NamedTuple) as two: None in the fields `names`, and None elsewhere."""
    return (
        [map_fields(s, lambda name, v: None if name in names else v) for s in states],
        [map_fields(s, lambda name, v: v if name in names else None) for s in states],
    )


def merge_fields(first: list[Any], second: list[Any], names: frozenset[str]) -> list[Any]:
    """The states `split_fields` split: the fields `names` from `second`, the rest from `first`."""
    return [
        map_fields(a, lambda name, v: getattr(b, name) if name in names else v)  # noqa: B023
        for a, b in zip(first, second)
    ]
