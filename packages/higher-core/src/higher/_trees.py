"""The tree module of core: nested containers of tensors, through torch's pytree registry.

Everything in core that walks a nested value (a rule's NamedTuple of lists of tensors, a torch
function's arguments, a solver's arguments, a param group's options) goes through here, and here
through `torch.utils._pytree`: its registry says what a node is (NamedTuples, tuples, lists,
dicts, OrderedDicts, and what else is registered) and how it splits and is rebuilt; anything else
is a leaf. The walk itself is a module function, not torch's `tree_flatten`: in torch 2.13 that
is a recursive closure, a reference cycle on every call, and the walks here run at every step
(and at every torch function a recomputed step calls).

`torch.func.vmap` and `torch.compile`'s loop operators take tensors, while an optimizer's state
also holds step counts and None: `flatten` takes the tensors out (in a fixed order) and leaves
the rest in a `Spec` that `unflatten` fills again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree


class _Leaf:
    """Where a tensor was."""

    def __repr__(self) -> str:
        return "*"


LEAF = _Leaf()
# torch's spec of a leaf: one shared instance (torch 2.13 deprecates making new ones)
_LEAF_SPEC: pytree.TreeSpec = getattr(pytree, "_LEAF_SPEC", None) or pytree.LeafSpec()


class Spec(NamedTuple):
    """What `flatten` kept of a tree: its structure, and its leaves with `LEAF` for each tensor."""

    structure: pytree.TreeSpec
    leaves: tuple[Any, ...]


def flatten(tree: Any) -> tuple[list[torch.Tensor], Spec]:
    """The tensors of `tree` (NamedTuples, tuples, lists and dicts of them), and its spec."""
    leaves: list[Any] = []
    structure = _structure(tree, leaves)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    kept = tuple(LEAF if isinstance(x, torch.Tensor) else x for x in leaves)
    return tensors, Spec(structure, kept)


def unflatten(spec: Spec, tensors: list[torch.Tensor]) -> Any:
    """The tree `flatten` took `tensors` from (the same order)."""
    it = iter(tensors)
    leaves = [next(it) if x is LEAF else x for x in spec.leaves]
    if next(it, None) is not None:
        raise ValueError("more leaves than the spec has places")
    return pytree.tree_unflatten(leaves, spec.structure)


def tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of `tree`, in order."""
    leaves: list[Any] = []
    _leaves(tree, leaves)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """`tree` with each leaf `x` replaced by `fn(x)`."""
    leaves: list[Any] = []
    structure = _structure(tree, leaves)
    return pytree.tree_unflatten([fn(x) for x in leaves], structure)


def _structure(node: Any, leaves: list[Any]) -> pytree.TreeSpec:
    """torch's `tree_flatten(node)`: the leaves appended to `leaves`, the spec returned."""
    kind = pytree._get_node_type(node)
    if kind not in pytree.SUPPORTED_NODES:
        leaves.append(node)
        return _LEAF_SPEC
    children, context = pytree.SUPPORTED_NODES[kind].flatten_fn(node)
    return pytree.TreeSpec(kind, context, [_structure(child, leaves) for child in children])


def _leaves(node: Any, leaves: list[Any]) -> None:
    """The leaves of `node` appended to `leaves` (no spec: for the hot paths)."""
    kind = pytree._get_node_type(node)
    if kind not in pytree.SUPPORTED_NODES:
        leaves.append(node)
        return
    for child in pytree.SUPPORTED_NODES[kind].flatten_fn(node)[0]:
        _leaves(child, leaves)


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
