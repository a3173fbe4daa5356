"""`DifferentiableOptimizer`: the 0.2.1 object API (param groups, per-slot state, `step`), a
shell over the step protocol (`_protocol`), its options (`_options`), its state in and out
(`_state_io`) and its copies (`_copying`)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import _copying, _protocol, _state_io
from ._errors import ArgumentTypeError
from ._options import apply_override
from ._protocols import FunctionalModel, GradCallback
from ._state import GroupState
from ._step import Bucket, StepPlan

if TYPE_CHECKING:
    from ._shell import StepDriver


class DifferentiableOptimizer(abc.ABC):
    """Base of the differentiable optimizers: steps that return new parameters, out of place.

    Built from a torch optimizer `other`: its param groups' hyperparameters are copied (numbers
    stay numbers, tensors stay the same tensors), `param_groups[g]["params"]` become slots that
    hold the current parameters of the group, and its state is cloned and detached into
    `state[g][i]`, so a torch optimizer that already stepped carries its moments over.

    New twins are best written as a pure `Rule` under `RuleOptimizer` (see `higher.optim.rule`).
    The 0.2.1 way works too: subclass this class and implement `_update(grouped_grads,
    **kwargs)`: for each group, for each slot with a gradient, compute the new parameter without
    in-place ops and assign it to `group["params"][i]`; keep per-slot state in
    `self.state[g][i]`; then `register_optim(TorchOptType, DiffOptType)`.

    Args:
        other: the torch optimizer to mirror.
        reference_params: the parameters, in the order `step` receives them; every parameter of
            `other` must be among them (by identity).
        fmodel: a functional model (anything with `fast_params` and `update_params`), updated
            on each `step`; optional when `step` is given `params=`.
        device: where to put the copied state (default: where it is).
        override: hyperparameter name -> list of values, one for all groups or one per group;
            values may be tensors that require grad. It persists.
        grad_callback: `grads -> grads`, run on the gradients before each update.
        track_higher_grads: False makes each step first order: new parameters are detached.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> (new_w,) = diffopt.step((w**2).sum(), params=[w])
        >>> new_w.tolist()
        [0.0, 0.0]
    """

    param_groups: list[dict[str, Any]]
    state: list[GroupState]
    #: what `step` hands over to (`higher.optim.internal.set_step_driver`); None: its own step
    _step_driver: StepDriver[DifferentiableOptimizer] | None = None
    #: what the last `step(loss)` left for the next to reuse (`_protocol.Repeat`)
    _repeat: Any = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[torch.Tensor],
        fmodel: FunctionalModel | None = None,
        device: torch.device | str | None = None,
        override: Mapping[str, Sequence[Any]] | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ArgumentTypeError(
                f"{type(self).__name__}() got unexpected keyword arguments {sorted(kwargs)}"
            )
        if not isinstance(other, torch.optim.Optimizer):
            raise ArgumentTypeError(
                f"expected a torch.optim.Optimizer to mirror, got {type(other).__name__}"
            )
        self._reference = list(reference_params)
        self._specs = [(p.shape, p.dtype) for p in self._reference]
        self._fmodel, self._device = fmodel, device
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)
        self._identity = object()  # what a plan is bound to (a copy gets its own)
        self._version = 0  # which state a plan was made from (each commit makes a new one)
        self.param_groups, self.state = [], []
        self._group_to_param_list: list[list[int]] = []
        _state_io.import_groups(self, other, self._reference, device)
        self._check_options(other)
        if override is not None:
            apply_override(self, override)

    # -- hooks a twin refines ------------------------------------------------------------------

    def _import_state(self, torch_state: Mapping[str, Any], device: Any) -> dict[str, Any]:
        """The state of one slot from the torch optimizer's: cloned, detached, `step` an int."""
        state = {k: _state_io.copy_state_value(v, device) for k, v in torch_state.items()}
        if "step" in state and isinstance(state["step"], torch.Tensor):
            state["step"] = round(float(state["step"].item()))
        return state

    def _check_options(self, other: torch.optim.Optimizer) -> None:  # noqa: B027
        """Refuse options the twin does not honour (a hand-written subclass accepts all)."""

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:  # noqa: B027
        """Check every hyperparameter of `groups` (a hand-written subclass accepts all)."""

    @abc.abstractmethod
    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        """Assign `group['params'][i]` a new parameter for each slot with a gradient."""

    def _make_plan(
        self,
        params: list[torch.Tensor],
        live: list[list[bool]],
        options: list[dict[str, Any]],
        kwargs: dict[str, Any],
    ) -> StepPlan:
        """The plan of a step over the slots flagged in `live` (here: `_update` on copies)."""
        return _protocol.hand_written_plan(self, params, live, options, kwargs)

    def _store_state(self, bucket: Bucket, new_state: Any) -> None:
        """Keep what `update` returned for a bucket (here: one dict per slot)."""
        for j, slot in zip(bucket.slots, new_state, strict=True):
            self.state[bucket.group][j] = slot

    def _repeat_plan(self, plan: StepPlan) -> StepPlan | None:
        """`plan` (the last step's) with the buckets' current state, or None where it cannot
        be reused (here: never; a hand-written `_update` is planned every step)."""
        return None

    # -- the public API ------------------------------------------------------------------------

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep their graph (False: each step's new parameters are detached).

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> opt = torch.optim.SGD([w], lr=0.1)
            >>> higher.optim.get_diff_optim(opt, [w], track_higher_grads=False).track_higher_grads
            False
        """
        return self._track_higher_grads

    @property
    def fmodel(self) -> FunctionalModel | None:
        """The functional model each `step` updates (None when steps are given `params=`).

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> print(higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.1), [w]).fmodel)
            None
        """
        return self._fmodel

    @property
    def grad_callback(self) -> GradCallback | None:
        """The constructor's `grads -> grads` callback, run before each update (or None).

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> clip = higher.optim.clip_grad_value(1.0)
            >>> diffopt = higher.optim.get_diff_optim(
            ...     torch.optim.SGD([w], lr=0.1), [w], grad_callback=clip)
            >>> diffopt.grad_callback is clip
            True
        """
        return self._grad_callback

    def step(
        self,
        loss: torch.Tensor | None = None,
        params: Iterable[torch.Tensor] | None = None,
        override: Mapping[str, Sequence[Any]] | None = None,
        grad_callback: GradCallback | None = None,
        *,
        closure: Callable[[], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        """Take one step from `params` (or the functional model's fast weights); a step that
        raises changes nothing.

        Args:
            loss: a scalar tensor computed from the current parameters.
            params: the current parameters (default: `fmodel.fast_params`).
            override: as in the constructor; it persists.
            grad_callback: `grads -> grads`; wins over the constructor's.
            closure: instead of `loss`, a function that computes it (as `torch.optim`'s
                `step(closure)`; called once, with grad enabled). The memory modes of
                `higher.innerloop_ctx(..., unroll=...)` need it: they call it again.
            **kwargs: passed to `_update`.

        Returns:
            The new parameters, in the order of `reference_params` (frozen ones unchanged);
            the functional model, when there is one, is updated to them.

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.tensor([1.0]))
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.25), [w])
            >>> diffopt.step((w**2).sum(), params=[w])[0].item()
            0.5
            >>> diffopt.step(closure=lambda: (w**2).sum(), params=[w])[0].item()
            0.5
        """
        if self._step_driver is not None:  # a memory mode takes the step
            return self._step_driver(self, loss, params, override, grad_callback, closure, kwargs)
        if closure is not None or loss is None:
            loss = _protocol.closure_loss(loss, closure)
        plain = params is None and override is None and grad_callback is None and not kwargs
        if plain:  # the signature of the last step: its checks and plan hold
            repeated = _protocol.repeat_step(self, loss)
            if repeated is not None:
                return repeated
        plan, grads, result = _protocol.compute_step(
            self, loss, params, grad_callback=grad_callback, override=override, update_kwargs=kwargs
        )
        new_params = _protocol.commit(self, plan, result)
        if plain:
            _protocol.remember(self, plan, [g is not None for g in grads], new_params)
        return new_params

    def gradients(
        self,
        loss: torch.Tensor,
        params: Iterable[torch.Tensor] | None = None,
        *,
        create_graph: bool | None = None,
        grad_callback: GradCallback | None = None,
    ) -> list[torch.Tensor | None]:
        """The gradients `step` would take for `loss`: one per parameter (None for those that
        do not require grad or that the loss does not use), after the grad_callback.

        Args:
            loss: a scalar tensor computed from the current parameters.
            params: the current parameters (default: the functional model's fast weights).
            create_graph: keep the gradients' graph (default: `track_higher_grads`).
            grad_callback: `grads -> grads`; wins over the constructor's.

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.tensor([3.0]))
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.1), [w])
            >>> diffopt.gradients((w**2).sum(), [w])[0].item()
            6.0
        """
        param_list = _protocol.current_params(self, params)
        return _protocol.gradients(self, loss, param_list, create_graph, grad_callback)

    # -- state in and out, copies --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state in `torch.optim.Optimizer.state_dict()`'s format (detached).

        Parameters are numbered across the param groups in order, as torch numbers them, and
        step counts are tensors as torch keeps them: a torch optimizer over the same parameters
        can `load_state_dict` it. `load_state_dict` restores it here.

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = torch.optim.Adam([w], lr=0.1)
            >>> diffopt = higher.optim.get_diff_optim(opt, [w])
            >>> _ = diffopt.step(w.sum(), params=[w])
            >>> opt.load_state_dict(diffopt.state_dict())
            >>> int(opt.state[w]["step"]), sorted(opt.state[w])
            (1, ['exp_avg', 'exp_avg_sq', 'step'])
        """
        return _state_io.state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what `state_dict` (this class's, or a torch optimizer's over the same
        parameters) holds: each slot's state (cloned; step counts back to ints) and options.

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = torch.optim.Adam([w], lr=0.1)
            >>> opt.zero_grad(); w.sum().backward(); opt.step()
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.Adam([w], lr=0.5), [w])
            >>> diffopt.load_state_dict(opt.state_dict())
            >>> diffopt.state[0][0]["step"], diffopt.param_groups[0]["lr"]
            (1, 0.1)
        """
        _state_io.load_state_dict(self, state_dict)
        self._version += 1

    def copy_state_to(self, opt: torch.optim.Optimizer, copy_params: bool = False) -> None:
        """Write the state (detached) into torch optimizer `opt`, to continue training with it.

        `opt` has the same param groups as this optimizer (typically the one it was built
        from). With `copy_params=True` the latest parameters are copied into `opt`'s
        parameters too (in place, without grad).

        Each value goes back in the type torch keeps it in (the step count as a tensor of torch's
        scalar dtype, on the device torch puts it for these options), so the torch optimizer
        continues exactly as from a state of its own.

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> opt = torch.optim.Adam([w], lr=0.1)
            >>> diffopt = higher.optim.get_diff_optim(opt, [w])
            >>> _ = diffopt.step(w.sum(), params=[w])
            >>> diffopt.copy_state_to(opt, copy_params=True)
            >>> int(opt.state[w]["step"]), round(w.item(), 6)
            (1, 0.9)
        """
        _state_io.copy_state_to(self, opt, copy_params)

    def sync_hyperparameters(
        self, opt: torch.optim.Optimizer, names: Sequence[str] = ("lr",)
    ) -> None:
        """Copy hyperparameters `names` from torch optimizer `opt`'s groups into this one's.

        This is how a torch LR scheduler drives a differentiable optimizer: build the
        scheduler on the torch optimizer, call `scheduler.step()` then `sync_hyperparameters`.

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> opt = torch.optim.SGD([w], lr=1.0)
            >>> diffopt = higher.optim.get_diff_optim(opt, [w])
            >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            >>> opt.step(); sched.step(); diffopt.sync_hyperparameters(opt)
            >>> diffopt.param_groups[0]["lr"]
            0.5
        """
        _state_io.sync_hyperparameters(self, opt, names)
        self._version += 1

    def __deepcopy__(self, memo: dict[int, Any]) -> DifferentiableOptimizer:
        copied: DifferentiableOptimizer = _copying.deep_copy(self, memo)
        return copied

    def __getstate__(self) -> dict[str, Any]:
        return _copying.pickled_state(self)
