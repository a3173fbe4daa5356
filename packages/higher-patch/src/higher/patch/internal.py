"""The internal seam of `higher.patch`, for sibling packages and plugin authors: not user API.

`higher` (core) runs a functional module's forward with the weights of another step (the memory
modes rebuild steps this way) and traces calls that pass every weight explicitly (the compiled
step). These two functions give it that access to a `FunctionalModule`; they may change with the
engine, and a model's user never needs them (`fmodel(x, params=...)` is the user's way).

Examples:
    >>> import torch, higher.patch
    >>> from higher.patch import internal
    >>> fnet = higher.patch.monkeypatch(torch.nn.Linear(1, 1, bias=False))
    >>> with internal.using(fnet, [torch.full((1, 1), 3.0)]):
    ...     print(fnet(torch.ones(1, 1)).item())
    3.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._module import FunctionalModule
from ._store import Params

__all__ = ["using", "vacated"]


@contextlib.contextmanager
def using(fmodule: FunctionalModule, params: Params) -> Iterator[list[torch.Tensor]]:
    """Run a block with `params` as the fast weights of `fmodule`, outside the history.

    Inside the block the module's forward, `fast_params` and `parameters()` see `params`;
    nothing is recorded, and the fast weights are as before when the block ends (even on
    error). For code that re-runs a forward with the weights of another step (the memory
    modes of `higher.innerloop_ctx` recompute steps this way).

    Examples:
        >>> fnet = higher.patch.monkeypatch(torch.nn.Linear(1, 1, bias=False))
        >>> with higher.patch.internal.using(fnet, [torch.full((1, 1), 3.0)]):
        ...     print(fnet(torch.ones(1, 1)).item())
        3.0
        >>> len(list(fnet.parameters(time=0))), fnet.weight.item() != 3.0
        (1, True)
    """
    store = fmodule._higher_store
    checked = store.check(params)
    before = store.current()
    store.place(checked)
    store.substitutes.append(checked)
    store.transient += 1
    try:
        yield checked
    finally:
        store.transient -= 1
        store.substitutes.pop()
        store.place(before)


@contextlib.contextmanager
def vacated(fmodule: FunctionalModule) -> Iterator[list[torch.Tensor]]:
    """Empty the parameter slots of `fmodule` for a block; yields the current fast weights.

    For tracing a call that passes every weight explicitly (`torch.func.functional_call`
    under `torch.compile`): with the slots empty, the module holds no tensor that aliases the
    call's inputs, which the compiler would otherwise check at every call. The slots hold the
    latest fast weights again when the block ends, even on error.

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> fnet = higher.patch.monkeypatch(net)
        >>> with higher.patch.internal.vacated(fnet) as weights:
        ...     y = torch.func.functional_call(fnet, dict(fnet.named_fast_params()),
        ...                                    (torch.ones(1, 2),))
        ...     print(fnet.weight is None, len(weights))
        True 2
        >>> fnet.weight.shape  # the slots hold the fast weights again
        torch.Size([1, 2])
    """
    store = fmodule._higher_store
    current = store.at(None)
    store.place([None] * len(current))
    try:
        yield current
    finally:
        store.place(store.at(None))
