"""Private names of higher 0.2.1's `higher.patch` that published code imports, with their meaning.

They are re-exported from `higher.patch` (outside `__all__`) so such code runs unchanged. Each
function warns with a `DeprecationWarning` when it is called, never when it is imported, so test
suites that turn warnings into errors can still import them; the warning names what to use.

0.2.1 built a functional module from per-module patched classes that read their weights from a
shared "params box" (a one-element list holding the weights of every parameter slot, in module
order). These helpers give that contract on this library's functional modules.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ._api import make_functional
from ._errors import PatchError
from ._module import FunctionalModule
from ._store import FastWeights, Params

_MonkeyPatchBase = FunctionalModule  # 0.2.1's base class of every functional module

# The nn.Module internals 0.2.1 did not copy onto a patched module.
_internal_attrs = frozenset(
    {
        "_backend",
        "_parameters",
        "_buffers",
        "_backward_hooks",
        "_forward_hooks",
        "_forward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
        "_modules",
    }
)

_BufferType = typing.Dict[str, typing.Optional[torch.Tensor]]  # noqa: UP006, UP045
_EncapsulatorType = typing.Optional[  # noqa: UP045
    typing.Callable[[FunctionalModule, torch.nn.Module], None]
]

ParamsBox = MutableSequence[Sequence[torch.Tensor] | None]


# Every warning here starts so; filter them with
# `-W "ignore:private higher 0.2.1 helper:DeprecationWarning"` (docs/migration-from-higher-0.2.md).
PREFIX = "private higher 0.2.1 helper"


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(
        f"{PREFIX} higher.patch.{name}, kept for code that imports it; {instead}",
        DeprecationWarning,
        stacklevel=3,
    )


def _store_of(module: torch.nn.Module, what: str) -> FastWeights:
    store = module.__dict__.get("_higher_store") if isinstance(module, torch.nn.Module) else None
    if not isinstance(store, FastWeights):
        raise PatchError(f"{what} needs a functional module, got {type(module).__name__}")
    return store


class _ParameterPlaceholder:
    """0.2.1's stand-in for a parameter in a patched module's printout.

    Examples:
        >>> import higher.patch
        >>> higher.patch._ParameterPlaceholder("weight")
        Parameter placeholder ("weight")
    """

    def __init__(self, name: str) -> None:
        self._param_name = name

    def __repr__(self) -> str:
        return f'Parameter placeholder ("{self._param_name}")'


_ParameterPlaceholder.__name__ = _ParameterPlaceholder.__qualname__ = "ParameterPlaceholder"


@contextmanager
def _modify_internally(fmodule: torch.nn.Module) -> Iterator[None]:
    """0.2.1: within this block, assigning a fast-weight attribute sets that slot only.

    The history is left as it is (0.2.1 used it to place weights before running a forward).

    Examples:
        >>> import warnings, torch, higher.patch
        >>> fnet = higher.patch.monkeypatch(torch.nn.Linear(2, 1))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     with higher.patch._modify_internally(fnet):
        ...         fnet.bias = torch.ones(1)
        >>> fnet.bias.item(), fnet.fast_params[1].item() == 1.0
        (1.0, False)
    """
    _deprecated("_modify_internally", "assign fmodel.<name> = tensor, or set fmodel.fast_params")
    store = _store_of(fmodule, "_modify_internally")
    store.slot_only += 1
    try:
        yield
    finally:
        store.slot_only -= 1


def _patched_parameters(
    self: torch.nn.Module, recurse: bool = True, time: int | None = None
) -> Iterator[torch.Tensor]:
    """0.2.1's `parameters` of a patched module: its fast weights at step `time` (latest: None).

    With `recurse=False` it still yields every fast weight of the tree, and warns. Without
    fast weights of its own it raises; when not tracking only `time` 0 or -1 is available.

    Examples:
        >>> import warnings, torch, higher.patch
        >>> fnet = higher.patch.monkeypatch(torch.nn.Linear(2, 1))
        >>> fnet.fast_params = [p * 2 for p in fnet.parameters()]
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     first = list(higher.patch._patched_parameters(fnet, time=0))
        >>> [p.shape for p in first] == [fnet.weight.shape, fnet.bias.shape]
        True
    """
    _deprecated("_patched_parameters", "use fmodel.parameters(time=t)")
    store = _store_of(self, "_patched_parameters")
    if not recurse:
        warnings.warn(
            "parameters(recurse=False) on a functional module still yields the fast weights of "
            "every submodule",
            UserWarning,
            stacklevel=2,
        )
    return iter(store.at(time))


def _slot_order(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """Every parameter slot, as 0.2.1 counted them: a module's own, then its children's, with a
    shared submodule or tied weight counted at each place."""
    index = module.__dict__.get("_higher_slot_index")
    if index is None:  # a module of the user's: its parameters
        index = {n: 0 for n, p in module._parameters.items() if p is not None}
    slots = [(module, name) for name in module._parameters if name in index]
    for child in module._modules.values():
        if child is not None:
            slots += _slot_order(child)
    return slots


def _make_functional(
    module: torch.nn.Module,
    params_box: ParamsBox,
    params_offset: int,
    root_patched: FunctionalModule | None = None,
) -> tuple[int, FunctionalModule, type[FunctionalModule]]:
    """0.2.1's patching helper: `(params_offset + slots, fmodule, type(fmodule))`.

    `fmodule` is a stateless functional copy of `module` (of a class made for this call, so
    changing the class changes nothing else). Called with `params=` it uses them (one tensor
    per parameter, as `make_functional`'s modules take them); called without, it takes one
    tensor per parameter slot from `params_box[0][params_offset:]` (tied weights and shared
    submodules have a slot at each place, in module order), as 0.2.1's patched modules did.
    `root_patched` is accepted for 0.2.1's signature; this copy needs no link to a root.

    Examples:
        >>> import warnings, torch, higher.patch
        >>> net, box = torch.nn.Linear(2, 1), [None]
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     end, fnet, cls = higher.patch._make_functional(net, box, 0)
        >>> box[0] = [torch.ones(1, 2), torch.zeros(1)]
        >>> end, fnet(torch.ones(3, 2)).tolist(), type(fnet) is cls
        (2, [[2.0], [2.0], [2.0]], True)
    """
    _deprecated("_make_functional", "use higher.patch.make_functional(module)")
    if not isinstance(params_offset, int) or params_offset < 0:
        raise PatchError(f"params_offset must be an int >= 0, got {params_offset!r}")
    fmodule = make_functional(module)
    unique = {id(p): i for i, p in enumerate(module.parameters())}
    slots = [unique[id(m._parameters[name])] for m, name in _slot_order(module)]
    base = type(fmodule)
    wrapped = type(module).__name__

    def weights(params: Params | None) -> Params | None:
        box = params_box[0]
        if params is not None or box is None:
            return params
        values = list(box[params_offset : params_offset + len(slots)])
        if len(values) != len(slots):
            raise PatchError(
                f"params_box[0] holds {len(box)} tensors; this module reads {len(slots)} from "
                f"offset {params_offset}"
            )
        taken: list[torch.Tensor | None] = [None] * len(unique)
        for i, value in zip(slots, values):
            if taken[i] is None:
                taken[i] = value
        return [t for t in taken if t is not None]

    def __call__(
        self: FunctionalModule, *args: Any, params: Params | None = None, **kw: Any
    ) -> Any:
        return base.__call__(self, *args, params=weights(params), **kw)

    def forward(self: FunctionalModule, *args: Any, params: Params | None = None, **kw: Any) -> Any:
        return base.forward(self, *args, params=weights(params), **kw)

    name = f"InnerFunctional{wrapped}"
    namespace: dict[str, Callable[..., Any] | str] = {
        "__call__": __call__,
        "forward": forward,
        "_wrapped_name": wrapped,
        "__qualname__": name,
    }
    cls: type[FunctionalModule] = type(name, (base,), namespace)
    fmodule.__class__ = cls
    return params_offset + len(slots), fmodule, cls


def _update_patched_params(
    fmodule: torch.nn.Module, params_box: Sequence[Sequence[torch.Tensor]], params_offset: int
) -> int:
    """0.2.1: put `params_box[0][params_offset:]` in `fmodule`'s parameter slots, in slot order.

    One tensor per slot (see `_make_functional`); the history is left as it is. Returns the
    offset after the slots of `fmodule` and its submodules.

    Examples:
        >>> import warnings, torch, higher.patch
        >>> fnet = higher.patch.monkeypatch(torch.nn.Linear(2, 1))
        >>> box = [[torch.ones(1, 2), torch.ones(1)]]
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     end = higher.patch._update_patched_params(fnet, box, 0)
        >>> end, fnet(torch.ones(1, 2)).item()
        (2, 3.0)
    """
    _deprecated("_update_patched_params", "set fmodel.fast_params, or pass params= to the call")
    store = _store_of(fmodule, "_update_patched_params")
    slots = _slot_order(fmodule)
    values = list(params_box[0][params_offset : params_offset + len(slots)])
    if len(values) != len(slots):
        raise PatchError(
            f"params_box[0] holds {len(params_box[0])} tensors; this module has {len(slots)} "
            f"parameter slots from offset {params_offset}"
        )
    for i, ((m, name), value) in enumerate(zip(slots, values)):
        index = m.__dict__["_higher_slot_index"][name]
        spec = store.specs[index]
        if (value.shape, value.dtype, value.device) != (spec.shape, spec.dtype, spec.device):
            store._mismatch(index, value, spec, f"params_box[0][{params_offset + i}]")
    store.slot_only += 1
    try:
        for (m, name), value in zip(slots, values):
            setattr(m, name, value)
    finally:
        store.slot_only -= 1
    return params_offset + len(slots)
