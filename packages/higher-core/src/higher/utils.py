"""Helpers of higher 0.2.1, kept for code that imported them.

`flatten` and `get_func_params` are public; the underscore helpers are kept because user code
and test suites imported them from 0.2.1, with the same behaviour.

Examples:
    >>> higher.utils.flatten([1, (2, {"a": 3}), [[4]]])
    [1, 2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["flatten", "get_func_params"]

_CONTAINERS = (list, tuple, dict, set)


def _is_container(target: Any) -> bool:
    """True for the containers these helpers recurse into: list, tuple, dict, set."""
    return isinstance(target, _CONTAINERS)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """Apply `map_fn` to every leaf of nested lists, tuples, sets and dicts, keeping their types.

    Examples:
        >>> higher.utils._recursive_map({"a": [1, (2, 3)]}, lambda v: v * 10)
        {'a': [10, (20, 30)]}
    """
    if isinstance(target, dict):
        return type(target)((k, _recursive_map(v, map_fn)) for k, v in target.items())
    if isinstance(target, (list, tuple, set)):
        mapped = [_recursive_map(v, map_fn) for v in target]
        if isinstance(target, tuple) and hasattr(target, "_fields"):  # a NamedTuple
            return type(target)(*mapped)
        return type(target)(mapped)
    return map_fn(target)


def flatten(x: Any) -> list[Any]:
    """The leaves of nested lists, tuples, sets and dict values, in order, as one flat list.

    Examples:
        >>> higher.utils.flatten(((1, 2), {"k": [3]}))
        [1, 2, 3]
    """
    if isinstance(x, dict):
        x = list(x.values())
    if not isinstance(x, (list, tuple, set)):
        return [x]
    return [leaf for item in x for leaf in flatten(item)]


def _copy_tensor(
    t: torch.Tensor, safe_copy: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """A detached copy of `t` (cloned when `safe_copy`) with `t`'s `requires_grad`, on `device`."""
    copied = t.detach().clone() if safe_copy else t.detach()
    if device is not None:
        copied = copied.to(device)
    return copied.requires_grad_(t.requires_grad)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """`_copy_tensor` (cloning) on every tensor of a nested container, moved to `device`."""

    def copy_leaf(value: Any) -> Any:
        return _copy_tensor(value, True, device) if isinstance(value, torch.Tensor) else value

    return _recursive_map(target, copy_leaf)


def _find_param_in_list(param: torch.Tensor, l: Iterable[torch.Tensor]) -> int | None:  # noqa: E741
    """The index of `param` in `l` by identity (not value), or None."""
    for i, p in enumerate(l):
        if p is param:
            return i
    return None


def _get_param_mapping(
    module: torch.nn.Module, seen: list[torch.Tensor], mapping: list[int]
) -> list[int]:
    """For each parameter slot of `module` (recursively), its index among distinct parameters.

    A parameter reachable from two slots (tied weights) is listed once in `seen`, and both slots
    map to that index. `seen` and `mapping` are extended in place and `mapping` is returned.
    """
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            found = len(seen)
            seen.append(param)
        mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def get_func_params(
    module: torch.nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[torch.Tensor]:
    """Detached copies of `module.parameters()` (keeping `requires_grad`), on `device`.

    Examples:
        >>> lin = torch.nn.Linear(2, 1)
        >>> w, b = higher.utils.get_func_params(lin)
        >>> w.is_leaf and w.requires_grad and w is not lin.weight
        True
    """
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
