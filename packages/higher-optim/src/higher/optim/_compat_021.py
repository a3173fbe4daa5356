"""Private names of higher 0.2.1's `higher.optim` that published code imports, with their meaning.

They are re-exported from `higher.optim` (outside `__all__`) so such code runs unchanged. Each
callable warns with a `DeprecationWarning` when it is called, never when it is imported, so test
suites that turn warnings into errors can still import them; the warning names what to use.
The type aliases are the 0.2.1 ones, spelled with `typing` as 0.2.1 spelled them.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

from ._base import DifferentiableOptimizer
from ._errors import OptimError
from ._registry import BUILTINS, _registered, register_optim

# 0.2.1's annotations: the gradients of step() grouped like param_groups, the per-group state,
# a gradient hook, an override dict, and a grad_callback.
_GroupedGradsType = typing.List[typing.List[torch.Tensor]]  # noqa: UP006
_StateType = typing.List[typing.DefaultDict[int, typing.Any]]  # noqa: UP006
_GradClosureType = typing.Callable[[torch.Tensor], torch.Tensor]
_OverrideType = typing.Dict[str, typing.List[typing.Any]]  # noqa: UP006
_GradCallbackType = typing.Callable[[typing.List[torch.Tensor]], typing.List[torch.Tensor]]  # noqa: UP006
_OptMappingType = typing.Dict[  # noqa: UP006
    typing.Type[torch.optim.Optimizer],  # noqa: UP006
    typing.Type[DifferentiableOptimizer],  # noqa: UP006
]

Number = float | int | torch.Tensor


# Every warning here starts so; filter them with
# `-W "ignore:private higher 0.2.1 helper:DeprecationWarning"` (docs/migration-from-higher-0.2.md).
PREFIX = "private higher 0.2.1 helper"


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(
        f"{PREFIX} higher.optim.{name}, kept for code that imports it; {instead}",
        DeprecationWarning,
        stacklevel=3,
    )


def _add(tensor: torch.Tensor, a1: Number, a2: torch.Tensor | None = None) -> torch.Tensor:
    """0.2.1's out-of-place `add`: `tensor + a1`, or `tensor + a1 * a2` given three arguments.

    0.2.1 accepted both of torch's signatures, `add(other)` and the old `add(value, other)`, and
    computed `value * other` first, then the sum (two roundings). `tensor + value * other` gives
    the same numbers, bit for bit; `torch.add(tensor, other, alpha=value)` rounds once, so its
    numbers differ by one rounding (which chaotic training grows).

    Examples:
        >>> import warnings, torch, higher.optim
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     out = higher.optim._add(torch.tensor([1.0]), 2.0, torch.tensor([3.0]))
        >>> out.tolist()
        [7.0]
    """
    _deprecated(
        "_add",
        "use `tensor + value * other`, which gives its numbers bit for bit (torch.add(tensor, "
        "other, alpha=value) rounds once where it rounds twice: the numbers change by one "
        "rounding)",
    )
    if a2 is None:
        return tensor + a1
    return tensor + a1 * a2


def _addcdiv(
    tensor: torch.Tensor, a1: Number, a2: torch.Tensor, a3: torch.Tensor | None = None
) -> torch.Tensor:
    """0.2.1's out-of-place `addcdiv`: `tensor + a1 / a2`, or `tensor + a1 * (a2 / a3)`.

    Those expressions give its numbers bit for bit; `torch.addcdiv(tensor, a2, a3, value=a1)`
    rounds in another order, so its numbers differ by a rounding.

    Examples:
        >>> import warnings, torch, higher.optim
        >>> t, t1, t2 = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     out = higher.optim._addcdiv(t, 0.5, t1, t2)
        >>> out.tolist()
        [1.75]
    """
    _deprecated(
        "_addcdiv",
        "use `tensor + value * (tensor1 / tensor2)`, which gives its numbers bit for bit "
        "(torch.addcdiv(tensor, tensor1, tensor2, value=value) rounds in another order: the "
        "numbers change by a rounding)",
    )
    if a3 is None:
        return tensor + a1 / a2
    return tensor + a1 * (a2 / a3)


def _addcmul(
    tensor: torch.Tensor, a1: Number, a2: torch.Tensor, a3: torch.Tensor | None = None
) -> torch.Tensor:
    """0.2.1's out-of-place `addcmul`: `tensor + a1 * a2`, or `tensor + a1 * a2 * a3`.

    Those expressions give its numbers bit for bit; `torch.addcmul(tensor, a2, a3, value=a1)`
    rounds in another order, so its numbers differ by a rounding.

    Examples:
        >>> import warnings, torch, higher.optim
        >>> t, t1, t2 = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     out = higher.optim._addcmul(t, 0.5, t1, t2)
        >>> out.tolist()
        [4.0]
    """
    _deprecated(
        "_addcmul",
        "use `tensor + value * tensor1 * tensor2`, which gives its numbers bit for bit "
        "(torch.addcmul(tensor, tensor1, tensor2, value=value) rounds in another order: the "
        "numbers change by a rounding)",
    )
    if a3 is None:
        return tensor + a1 * a2
    return tensor + a1 * a2 * a3


def _get_mask_closure(mask: torch.Tensor) -> _GradClosureType:
    """0.2.1's gradient hook: zero the gradient where `mask` is True, at every order.

    The hook returns the masked gradient and, when that gradient itself requires grad (a
    double backward), registers itself on it, so higher-order gradients are masked too.

    Examples:
        >>> import warnings, torch, higher.optim
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     hook = higher.optim._get_mask_closure(torch.tensor([True, False]))
        >>> hook(torch.tensor([5.0, 6.0])).tolist()
        [0.0, 6.0]
    """
    _deprecated("_get_mask_closure", "register your own hook with tensor.register_hook")
    return _mask_hook(mask)


def _mask_hook(mask: torch.Tensor) -> _GradClosureType:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        masked = torch.where(mask, torch.zeros_like(grad), grad)
        if masked.requires_grad:
            masked.register_hook(_mask_hook(mask))
        return masked

    return hook


def _maybe_mask(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """0.2.1: if `tensor` requires grad, zero its gradient where `mask` is True (at every order).

    Examples:
        >>> import warnings, torch, higher.optim
        >>> x = torch.ones(2, requires_grad=True)
        >>> y = x * 1.0
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     higher.optim._maybe_mask(y, torch.tensor([True, False]))
        >>> (3 * y).sum().backward()
        >>> x.grad.tolist()
        [0.0, 3.0]
    """
    _deprecated("_maybe_mask", "register your own hook with tensor.register_hook")
    if tensor.requires_grad:
        tensor.register_hook(_mask_hook(mask))


def _recursive_apply(replacement: Any, target: Any) -> Any:
    """0.2.1's helper of `apply_trainable_opt_params`: `target`'s values taken from `replacement`.

    A tensor replacing a number gives a number of the target's type; a tensor replacing a
    tensor is written into the target's data (in place) and the target returned; lists, tuples,
    dicts and sets are walked in step. Anything else is a `ValueError`, as in 0.2.1.

    Examples:
        >>> import warnings, torch, higher.optim
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     higher.optim._recursive_apply((torch.tensor(0.5), torch.tensor(0.25)), (0.9, 1e-3))
        (0.5, 0.25)
    """
    _deprecated("_recursive_apply", "use higher.optim.apply_trainable_opt_params")
    return _apply(replacement, target)


def _apply(replacement: Any, target: Any) -> Any:
    containers = (list, tuple, dict, set)
    if not isinstance(replacement, type(target)):
        if isinstance(replacement, torch.Tensor) and not isinstance(target, containers):
            return type(target)(replacement.item())
        raise OptimError(
            f"expected a non-container target for a {type(replacement).__name__} replacement, "
            f"got {type(target).__name__} {target!r}"
        )
    if isinstance(replacement, torch.Tensor) and isinstance(target, torch.Tensor):
        target.data = replacement.to(target.device).data
        return target
    if isinstance(target, (list, tuple)):
        return type(target)([_apply(r, t) for r, t in zip(replacement, target)])
    if isinstance(target, dict):
        pairs = zip(replacement.values(), target.items())
        return type(target)({k: _apply(r, t) for r, (k, t) in pairs})
    if isinstance(target, set):
        return type(target)({_apply(r, t) for r, t in zip(replacement, target)})
    raise OptimError(
        f"cannot apply a replacement of type {type(replacement).__name__} to a target of type "
        f"{type(target).__name__}"
    )


class _OptMapping(MutableMapping[type, type]):
    """0.2.1's `_opt_mapping`: torch optimizer type -> differentiable optimizer type.

    A live view of the registry: reading finds the registered or built-in twin of that exact
    type; assigning registers one (as `higher.optim.register_optim` does); deleting removes a
    registration (built-in twins stay).
    """

    def _table(self) -> dict[type, type]:
        return {**BUILTINS, **_registered}

    def __getitem__(self, optim_type: type) -> type:
        _deprecated("_opt_mapping", "use higher.optim.twin_of(optim_type)")
        return self._table()[optim_type]

    def __setitem__(self, optim_type: type, diff_optim_type: type) -> None:
        _deprecated("_opt_mapping", "use higher.optim.register_optim(optim_type, twin)")
        register_optim(optim_type, diff_optim_type)

    def __delitem__(self, optim_type: type) -> None:
        _deprecated("_opt_mapping", "registrations are meant to stay")
        if optim_type in _registered:
            del _registered[optim_type]
        elif optim_type in BUILTINS:
            raise OptimError(f"the built-in twin of {optim_type.__name__} cannot be removed")
        else:
            raise KeyError(optim_type)

    def __iter__(self) -> Iterator[type]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


_opt_mapping = _OptMapping()
