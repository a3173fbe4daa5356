"""What the optimizer shell's helper modules (`_options`, `_state_io`, `_copying`, `_protocol`,
`_buckets`) need of the optimizer they work on, as structural types: those modules are imported
by `_base.py`/`_twins.py`, so they name the optimizer by these protocols instead of importing
its class back (an import cycle)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch

from ._protocols import FunctionalModel, GradCallback
from ._rule import Rule
from ._state import GroupState
from ._step import Bucket, StepPlan

#: (group, slots, positions of the slots among the step's parameters): one run of the rule
Run = tuple[int, tuple[int, ...], tuple[int, ...]]
#: the last bucketing of an optimizer: its `live` key, its runs, and whether their state was
#: empty
Cache = tuple[tuple[list[list[bool]], list[bool]], list[Run], bool]

#: the optimizer a step driver drives
_Driven = TypeVar("_Driven", contravariant=True)


class OptionsShell(Protocol):
    """What `_options` uses: the param groups and the twin's check of their options."""

    param_groups: list[dict[str, Any]]

    def _check_groups(self, groups: list[dict[str, Any]]) -> None: ...


class StateShell(OptionsShell, Protocol):
    """What `_state_io` uses: the groups' slot layout and state, and the state import hook."""

    state: list[GroupState]
    _group_to_param_list: list[list[int]]
    _device: torch.device | str | None

    def _import_state(self, torch_state: Mapping[str, Any], device: Any) -> dict[str, Any]: ...


class CopyShell(Protocol):
    """What `_copying` uses: every tensor the optimizer holds is among these."""

    param_groups: list[dict[str, Any]]
    state: list[GroupState]
    _reference: list[torch.Tensor]


class OptimizerShell(StateShell, CopyShell, Protocol):
    """What `_protocol` uses: the whole step protocol's view of a differentiable optimizer."""

    _specs: list[tuple[torch.Size, torch.dtype]]
    _identity: object
    _version: int
    _step_driver: StepDriver[Any] | None
    _repeat: Any  # a `_protocol.Repeat`, or None

    @property
    def fmodel(self) -> FunctionalModel | None: ...

    @property
    def track_higher_grads(self) -> bool: ...

    @property
    def grad_callback(self) -> GradCallback | None: ...

    def _make_plan(
        self,
        params: list[torch.Tensor],
        live: list[list[bool]],
        options: list[dict[str, Any]],
        kwargs: dict[str, Any],
    ) -> StepPlan: ...

    def _store_state(self, bucket: Bucket, new_state: Any) -> None: ...

    def _repeat_plan(self, plan: StepPlan) -> StepPlan | None: ...

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None: ...

    def step(
        self,
        loss: torch.Tensor | None = None,
        params: Iterable[torch.Tensor] | None = None,
        override: Mapping[str, Sequence[Any]] | None = None,
        grad_callback: GradCallback | None = None,
        *,
        closure: Callable[[], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]: ...


class RuleShell(Protocol):
    """What `_buckets` uses of a twin that runs a `Rule`."""

    state: list[GroupState]
    _group_to_param_list: list[list[int]]
    _bucket_cache: Cache | None
    _version: int

    @property
    def rule(self) -> Rule: ...

    def _check_group(
        self, g: int, group: dict[str, Any], params: Sequence[torch.Tensor]
    ) -> None: ...


class StepDriver(Protocol[_Driven]):
    """What takes over `diffopt.step` for one optimizer (see `set_step_driver`): called with
    the optimizer and `step`'s arguments as given, it returns the new parameters.

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> def plain(diffopt, loss, params, override, grad_callback, closure, kwargs):
        ...     internal.set_step_driver(diffopt, None)  # the next steps are plain again
        ...     return diffopt.step(loss, params, override, grad_callback, closure=closure)
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> internal.set_step_driver(diffopt, plain)
        >>> diffopt.step(w.sum(), params=[w])[0].item()
        0.5
    """

    def __call__(
        self,
        diffopt: _Driven,
        loss: torch.Tensor | None,
        params: Iterable[torch.Tensor] | None,
        override: Mapping[str, Sequence[Any]] | None,
        grad_callback: GradCallback | None,
        closure: Callable[[], torch.Tensor] | None,
        kwargs: dict[str, Any],
        /,
    ) -> list[torch.Tensor]: ...
