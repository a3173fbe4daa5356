"""`DifferentiableOptimizer`: the 0.2.1 object API (param groups, per-slot state, `step`)."""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from ._errors import ArgumentTypeError, HyperparameterTypeError, OptimError
from ._protocols import FunctionalModel, GradCallback
from ._step import Bucket, StepPlan, StepResult

_GroupState = defaultdict[int, dict[str, Any]]


def _copy_state_value(value: Any, device: torch.device | str | None) -> Any:
    if isinstance(value, torch.Tensor):
        copied = value.detach().clone()
        return copied if device is None else copied.to(device)
    return value


class DifferentiableOptimizer(abc.ABC):
    """Base of the differentiable optimizers: steps that return new parameters, out of place.

    Built from a torch optimizer `other`: its param groups' hyperparameters are copied (numbers
    stay numbers, tensors stay the same tensors), `param_groups[g]["params"]` become slots that
    hold the current parameters of the group, and its state is cloned and detached into
    `state[g][i]`, so a torch optimizer that already stepped carries its moments over.

    A step is three phases anything can drive (the step protocol): `plan` checks it and gathers
    what it needs, `StepPlan.update` computes it as a pure function, `commit` stores it; `step`
    runs the three with the loss's gradients.

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
    state: list[_GroupState]

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
        reference = list(reference_params)
        position = {id(p): i for i, p in enumerate(reference)}
        self._reference = reference
        self._specs = [(p.shape, p.dtype) for p in reference]
        self._fmodel = fmodel
        self._device = device
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)
        self.param_groups = []
        self._group_to_param_list: list[list[int]] = []
        self.state = []
        seen: dict[int, tuple[int, int]] = {}
        for g, group in enumerate(other.param_groups):
            mapping: list[int] = []
            for j, p in enumerate(group["params"]):
                if id(p) not in position:
                    raise OptimError(
                        f"parameter {j} of param group {g} of the {type(other).__name__} "
                        f"(shape {tuple(p.shape)}) is not among reference_params; pass the "
                        "parameters the optimizer was built on (e.g. model.parameters())"
                    )
                if id(p) in seen:  # torch steps it twice (and warns that this will be an error)
                    raise OptimError(
                        f"parameter {j} of param group {g} of the {type(other).__name__} is the "
                        f"same tensor as parameter {seen[id(p)][1]} of group {seen[id(p)][0]}: "
                        "give each parameter to the optimizer once"
                    )
                seen[id(p)] = (g, j)
                mapping.append(position[id(p)])
            copied = {k: v for k, v in group.items() if k != "params"}
            copied["params"] = [reference[i] for i in mapping]
            self.param_groups.append(copied)
            self._group_to_param_list.append(mapping)
            group_state: _GroupState = defaultdict(dict)
            for j, p in enumerate(group["params"]):
                torch_state = other.state.get(p)
                if torch_state:
                    group_state[j] = self._import_state(torch_state, device)
            self.state.append(group_state)
        self._check_options(other)
        if override is not None:
            self._apply_override(override)

    # -- hooks a twin refines ------------------------------------------------------------------

    def _import_state(self, torch_state: Mapping[str, Any], device: Any) -> dict[str, Any]:
        """The state of one slot from the torch optimizer's: cloned, detached, `step` an int."""
        state = {k: _copy_state_value(v, device) for k, v in torch_state.items()}
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

    def _validated_options(self, override: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
        """The param groups' options with `override` applied, every value checked; nothing is
        changed (a rejected override leaves the optimizer as it was)."""
        if not isinstance(override, Mapping):
            raise HyperparameterTypeError(
                f"override must be a dict of hyperparameter -> list of values, got {override!r}"
            )
        n_groups = len(self.param_groups)
        known = set().union(*(g.keys() for g in self.param_groups)) - {"params"}
        options = [dict(group) for group in self.param_groups]
        for name, values in override.items():
            if name not in known:
                raise OptimError(
                    f"override key {name!r} is not a hyperparameter of "
                    f"{type(self).__name__}; expected one of {sorted(known)}"
                )
            if not isinstance(values, (list, tuple)):
                raise HyperparameterTypeError(
                    f"override[{name!r}] must be a list of values (one for all groups or one "
                    f"per group), got {type(values).__name__}"
                )
            if len(values) not in (1, n_groups):
                raise OptimError(self._override_count_message(name, values, n_groups))
            for g, group in enumerate(options):
                group[name] = values[0] if len(values) == 1 else values[g]
        self._check_groups(options)
        return options

    def _override_count_message(self, name: str, values: Sequence[Any], n_groups: int) -> str:
        """Why `override[name]`, a list of `len(values)` values, does not fit the groups."""
        if n_groups > 1:
            return (
                f"override[{name!r}] has {len(values)} values; expected 1 (all groups) or "
                f"{n_groups} (one per param group)"
            )
        message = (
            f"override[{name!r}] has {len(values)} values; expected 1, the value for the "
            "optimizer's single param group"
        )
        n = len(self.param_groups[0]["params"])
        per_param = getattr(getattr(self, "rule", None), "per_param_lr", True)
        if name == "lr" and per_param and len(values) == n:  # perhaps one rate per parameter
            rates = ", ".join(f"lr_{i}" for i in range(n)) if n <= 3 else f"lr_0, ..., lr_{n - 1}"
            message += (
                f"; for one learning rate per parameter, put them in one list: override={{'lr': "
                f"[[{rates}]]}} (one tensor per parameter: 0-d, or shaped like its parameter "
                "for one rate per element)"
            )
        return message

    def _apply_override(self, override: Mapping[str, Sequence[Any]]) -> None:
        for group, options in zip(self.param_groups, self._validated_options(override)):
            group.update((k, v) for k, v in options.items() if k != "params")

    def _gradients(
        self, loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool | None = None
    ) -> list[torch.Tensor | None]:
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(params)
        if not trainable:
            return grads
        if not loss.requires_grad:
            raise OptimError(
                "the loss does not require grad, so it does not depend on the parameters; "
                "compute it from the parameters given to step (or the functional model)"
            )
        found = torch.autograd.grad(
            loss,
            [params[i] for i in trainable],
            create_graph=self._track_higher_grads if create_graph is None else create_graph,
            allow_unused=True,
        )
        if all(g is None for g in found):
            raise OptimError(self._unrelated_loss(loss, params))
        for i, grad in zip(trainable, found, strict=True):
            grads[i] = grad
        return grads

    def _unrelated_loss(self, loss: torch.Tensor, params: list[torch.Tensor]) -> str:
        """Why a loss that requires grad depends on none of the step's parameters."""
        what = "the parameters given to step" if self._fmodel is None else "the fast weights"
        suspects = [("the original model's parameters", self._reference)]
        history = getattr(self._fmodel, "parameters", None)
        if callable(history):  # a higher.patch module: the weights before the last step
            with contextlib.suppress(Exception):
                suspects.append(("the fast weights of an earlier step", list(history(time=-2))))
        for name, tensors in suspects:
            tensors = [t for t in tensors if t.requires_grad and all(t is not p for p in params)]
            if tensors and any(
                g is not None for g in torch.autograd.grad(loss, tensors, allow_unused=True)
            ):
                return (
                    f"the loss depends on none of {what} but on {name}: compute it from the "
                    "current weights (fmodel(...) after the last step, not the model itself or a "
                    "loss computed before a step), then call step"
                )
        return (
            f"the loss depends on none of {what}: compute it from the current weights "
            "(fmodel(...) or the params given to step), not from other tensors"
        )

    def _current_params(self, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
        if params is not None:
            return params if isinstance(params, list) else list(params)
        if self._fmodel is None:
            raise OptimError(
                "step() needs the current parameters: pass params=[...] or build the "
                "optimizer with fmodel="
            )
        fast = self._fmodel.fast_params
        if fast is None:
            raise OptimError("the functional model has no fast weights; pass params=[...]")
        return list(fast)

    def _check_step_params(self, params: list[torch.Tensor]) -> None:
        specs = self._specs
        if len(params) == len(specs):
            try:
                if all(
                    p.shape == shape and p.dtype == dtype
                    for p, (shape, dtype) in zip(params, specs)
                ):
                    return
            except AttributeError:  # not a tensor: said below
                pass
        if len(params) != len(self._reference):
            raise OptimError(
                f"step got {len(params)} parameters; expected {len(self._reference)} "
                "(one per reference parameter, in the same order)"
            )
        for i, (p, ref) in enumerate(zip(params, self._reference, strict=True)):
            if not isinstance(p, torch.Tensor):
                raise ArgumentTypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
            if p.shape != ref.shape:
                raise OptimError(
                    f"params[{i}] has shape {tuple(p.shape)}; expected {tuple(ref.shape)} "
                    f"(the shape of reference parameter {i})"
                )
            if p.dtype != ref.dtype:
                raise OptimError(
                    f"params[{i}] has dtype {p.dtype}; expected {ref.dtype} (the dtype of "
                    f"reference parameter {i}, which the optimizer state follows)"
                )

    # -- the step protocol: plan -> update -> commit ------------------------------------------

    def plan(
        self,
        params: Iterable[torch.Tensor] | None = None,
        *,
        stepped: Sequence[bool] | None = None,
        override: Mapping[str, Sequence[Any]] | None = None,
        **kwargs: Any,
    ) -> StepPlan:
        """Check one step and gather what it needs; nothing is changed.

        Args:
            params: the current parameters, in the order of `reference_params` (default: the
                functional model's fast weights).
            stepped: per parameter, whether it is updated (default: whether it requires grad);
                a parameter the loss does not use has no gradient and is not stepped.
            override: hyperparameters for this step and, once committed, the later ones.
            **kwargs: passed to a hand-written `_update`.

        Returns:
            A `StepPlan`: run it with `plan.update(params, grads)`, then `commit` the result.

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
            >>> plan = diffopt.plan([w], override={"lr": [0.25]})
            >>> result = plan.update([w], [torch.ones(2)])
            >>> diffopt.commit(plan, result)[0].tolist(), diffopt.param_groups[0]["lr"]
            ([0.75, 0.75], 0.25)
        """
        param_list = self._current_params(params)
        self._check_step_params(param_list)
        return self._plan(param_list, stepped, override, kwargs)

    def _plan(
        self,
        param_list: list[torch.Tensor],
        stepped: Sequence[bool] | None,
        override: Mapping[str, Sequence[Any]] | None,
        kwargs: dict[str, Any],
    ) -> StepPlan:
        """`plan` for parameters already checked."""
        options = self.param_groups if override is None else self._validated_options(override)
        if stepped is None:
            stepped = [p.requires_grad for p in param_list]
        elif len(stepped) != len(param_list):
            raise OptimError(
                f"stepped has {len(stepped)} entries; expected {len(param_list)} (one per "
                "parameter)"
            )
        live = [[bool(stepped[i]) for i in mapping] for mapping in self._group_to_param_list]
        return self._make_plan(param_list, live, options, kwargs)

    def _make_plan(
        self,
        params: list[torch.Tensor],
        live: list[list[bool]],
        options: list[dict[str, Any]],
        kwargs: dict[str, Any],
    ) -> StepPlan:
        """A plan that runs the hand-written `_update` (one bucket per group) on copies."""
        buckets = []
        for g, (flags, mapping) in enumerate(zip(live, self._group_to_param_list, strict=True)):
            slots = tuple(j for j, flag in enumerate(flags) if flag)
            if slots:
                states = [dict(self.state[g].get(j, ())) for j in slots]
                indices = tuple(mapping[j] for j in slots)
                buckets.append(Bucket(g, slots, indices, states, options[g]))
        requires_grad = [p.requires_grad for p in params]
        fallback = functools.partial(self._run_update, kwargs=kwargs)
        return StepPlan(buckets, options, requires_grad, None, fallback, type(self).__name__)

    def _run_update(
        self,
        plan: StepPlan,
        params: Sequence[torch.Tensor],
        grads: list[torch.Tensor | None],
        states: list[Any],
        kwargs: dict[str, Any],
    ) -> StepResult:
        """Run `_update` on scratch param groups and state: this optimizer is left unchanged."""
        mappings = self._group_to_param_list
        groups = [
            {**options, "params": [params[i] for i in mapping]}
            for options, mapping in zip(plan.options, mappings, strict=True)
        ]
        state = [defaultdict(dict, {j: dict(s) for j, s in gs.items()}) for gs in self.state]
        for bucket, bucket_states in zip(plan.buckets, states, strict=True):
            for j, slot in zip(bucket.slots, bucket_states, strict=True):
                state[bucket.group][j] = dict(slot)
        stepped = {i for bucket in plan.buckets for i in bucket.indices}
        grouped = [[grads[i] if i in stepped else None for i in mapping] for mapping in mappings]
        saved = self.param_groups, self.state
        self.param_groups, self.state = groups, state
        try:
            self._update(grouped, **kwargs)
        finally:
            self.param_groups, self.state = saved
        new_params = list(params)
        for group, mapping in zip(groups, mappings, strict=True):
            for j, i in enumerate(mapping):
                new_params[i] = group["params"][j]
        new_states = [[state[b.group][j] for j in b.slots] for b in plan.buckets]
        return StepResult(new_params, new_states)

    def _store_state(self, bucket: Bucket, new_state: Any) -> None:
        """Keep what `update` returned for a bucket (here: one dict per slot)."""
        for j, slot in zip(bucket.slots, new_state, strict=True):
            self.state[bucket.group][j] = slot

    def commit(
        self, plan: StepPlan, result: StepResult, *, first_order: bool | None = None
    ) -> list[torch.Tensor]:
        """Store a step's outcome: the new parameters (into the functional model, when there is
        one), the new state, and the step's override. Returns the new parameters.

        Args:
            plan: the plan `result` came from.
            result: what `plan.update` returned.
            first_order: detach the new parameters and the state, each keeping its
                `requires_grad` (default: when this optimizer does not track higher-order
                gradients, or grad mode is disabled).

        Examples:
            >>> import torch, higher.optim
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
            >>> plan = diffopt.plan([w])
            >>> diffopt.commit(plan, plan.update([w], [torch.ones(1)]))[0].item()
            0.5
        """
        if first_order is None:  # no graph is kept without tracking, or with grad disabled
            first_order = not (self._track_higher_grads and torch.is_grad_enabled())
        new_params = result.params
        if first_order:
            new_params = [
                q.detach().requires_grad_(r)
                for q, r in zip(new_params, plan.requires_grad, strict=True)
            ]
        if (
            self._fmodel is not None
        ):  # the one write that checks: first, so a refusal changes nothing
            self._fmodel.update_params(new_params)
        for group, options in zip(self.param_groups, plan.options, strict=True):
            if options is not group:
                group.update((k, v) for k, v in options.items() if k != "params")
        for bucket, new_state in zip(plan.buckets, result.states, strict=True):
            self._store_state(bucket, new_state)
        if first_order:
            self._detach_state()
        self._load_params(new_params)
        return new_params

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
        """Take one step from `params` (or the functional model's fast weights).

        `plan`, `StepPlan.update` and `commit` in one call, with the gradients of `loss`: a
        step that raises changes nothing.

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
        if closure is not None or loss is None:
            loss = self._closure_loss(loss, closure)
        param_list = self._current_params(params)
        grads = self.gradients(loss, param_list, grad_callback=grad_callback)
        plan = self._plan(param_list, [g is not None for g in grads], override, kwargs)
        called_back = grad_callback is not None or self._grad_callback is not None
        if not called_back and not any(g is not None and g.is_sparse for g in grads):
            return self.commit(plan, plan.run(param_list, grads))  # autograd's own gradients
        return self.commit(plan, plan.update(param_list, grads))

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

        For code that drives the step protocol itself (`plan`, `StepPlan.update`, `commit`),
        with the checks and messages of `step`.

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
        param_list = self._current_params(params)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise OptimError(f"the loss must be a scalar tensor (one element), got {shape}")
        self._check_step_params(param_list)
        grads = self._gradients(loss, param_list, create_graph)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        return grads if callback is None else self._called_back(callback, grads)

    @staticmethod
    def _closure_loss(
        loss: torch.Tensor | None, closure: Callable[[], torch.Tensor] | None
    ) -> torch.Tensor:
        if closure is None:
            raise OptimError(
                "step needs the loss: step(loss) or step(closure=lambda: loss_fn(...))"
            )
        if loss is not None:
            raise OptimError("give step either the loss or a closure that computes it, not both")
        if not callable(closure):
            raise ArgumentTypeError(f"closure must be callable, got {type(closure).__name__}")
        with torch.enable_grad():
            return closure()

    def _called_back(
        self, callback: GradCallback, grads: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        returned = callback(grads)
        if not isinstance(returned, (list, tuple)):
            raise OptimError(
                "grad_callback must return a list of gradients (one per parameter, None "
                f"where there is none), got {type(returned).__name__}"
            )
        if len(returned) != len(grads):
            raise OptimError(
                f"grad_callback returned {len(returned)} gradients; expected {len(grads)}"
            )
        return list(returned)

    def _load_params(self, params: list[torch.Tensor]) -> None:
        """Put `params` (in the order of `reference_params`) into the groups' slots."""
        for group, mapping in zip(self.param_groups, self._group_to_param_list, strict=True):
            group["params"] = [params[i] for i in mapping]

    def _detach_state(self) -> None:
        for group_state in self.state:
            for slot in group_state.values():
                for key, value in slot.items():
                    if isinstance(value, torch.Tensor):
                        slot[key] = value.detach()

    # -- copies and checkpoints ----------------------------------------------------------------

    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor this optimizer holds: slots, options, state, reference parameters."""
        found = list(self._reference)
        for group in self.param_groups:
            for value in group.values():
                items = value if isinstance(value, (list, tuple)) else [value]
                found.extend(t for t in items if isinstance(t, torch.Tensor))
        for group_state in self.state:
            for slot in group_state.values():
                found.extend(v for v in slot.values() if isinstance(v, torch.Tensor))
        return found

    def __deepcopy__(self, memo: dict[int, Any]) -> DifferentiableOptimizer:
        # Tensors with history cannot be deep-copied: the copy gets detached clones of them, as
        # `copy.deepcopy(fmodel)` does (the functional model, when there is one, is copied too).
        for t in self._tensors():
            if id(t) not in memo and not t.is_leaf:
                memo[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __getstate__(self) -> dict[str, Any]:
        # Pickling: tensors with history are saved detached (their graph cannot be saved).
        memo: dict[int, Any] = {}
        for t in self._tensors():
            if not t.is_leaf:
                memo[id(t)] = t.detach().requires_grad_(t.requires_grad)
        state = {k: v for k, v in self.__dict__.items() if k != "_bucket_cache"}
        return _replaced(state, memo)  # type: ignore[no-any-return]

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
        states: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for group, group_state in zip(self.param_groups, self.state, strict=True):
            numbers = list(range(index, index + len(group["params"])))
            for j, number in enumerate(numbers):
                slot = group_state.get(j)
                if slot:
                    states[number] = {
                        k: _as_torch_value(v, None, _device_of(v)) for k, v in slot.items()
                    }
            options = {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                for k, v in group.items()
                if k != "params"
            }
            groups.append({**options, "params": numbers})
            index += len(numbers)
        return {"state": states, "param_groups": groups}

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
        groups = state_dict.get("param_groups")
        sizes = [len(g["params"]) for g in self.param_groups]
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != sizes:
            raise OptimError(
                f"state_dict has param groups of sizes "
                f"{[len(g.get('params', ())) for g in groups or []]}; expected {sizes}"
            )
        saved = state_dict.get("state", {})
        options = {k: [g[k] for g in groups] for k in groups[0] if k != "params"}
        known = set().union(*(g.keys() for g in self.param_groups)) - {"params"}
        new_options = self._validated_options({k: v for k, v in options.items() if k in known})
        new_state = []
        for group in groups:
            group_state: _GroupState = defaultdict(dict)
            for j, number in enumerate(group["params"]):
                if saved.get(number):
                    group_state[j] = self._import_state(saved[number], self._device)
            new_state.append(group_state)
        for group, opts in zip(self.param_groups, new_options, strict=True):
            group.update((k, v) for k, v in opts.items() if k != "params")
        self.state = new_state

    # -- back to torch -------------------------------------------------------------------------

    def _torch_pairs(self, opt: torch.optim.Optimizer) -> list[tuple[int, int, torch.Tensor]]:
        if len(opt.param_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(opt.param_groups, self.param_groups, strict=True)
        ):
            raise OptimError(
                f"the {type(opt).__name__} has param groups of sizes "
                f"{[len(g['params']) for g in opt.param_groups]}; expected "
                f"{[len(g['params']) for g in self.param_groups]} as in {type(self).__name__}"
            )
        return [
            (g, j, p)
            for g, group in enumerate(opt.param_groups)
            for j, p in enumerate(group["params"])
        ]

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
        templates: dict[tuple[Any, ...], dict[str, Any]] = {}
        for g, j, p in self._torch_pairs(opt):
            ours = self.state[g].get(j)
            if ours:
                key = (g, p.shape, p.dtype, p.device)
                if key not in templates:
                    templates[key] = _torch_state_template(opt, opt.param_groups[g], p)
                previous = opt.state.get(p) or templates[key]
                opt.state[p] = {
                    name: _as_torch_value(value, previous.get(name), p.device)
                    for name, value in ours.items()
                }
            if copy_params:
                with torch.no_grad():
                    p.copy_(self.param_groups[g]["params"][j])

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
        self._torch_pairs(opt)
        for name in names:
            values = [group[name] for group in opt.param_groups]
            self._apply_override({name: values})


def _torch_state_template(
    opt: torch.optim.Optimizer, group: Mapping[str, Any], p: torch.Tensor
) -> dict[str, Any]:
    """The state torch itself keeps for a parameter like `p` under `group`'s options: one step
    of a fresh optimizer of `opt`'s type on a stand-in (its values are not used, its types are).
    Empty where that optimizer cannot be built so (a plugin with another signature)."""
    options = {k: v for k, v in group.items() if k in opt.defaults}
    stand_in = torch.zeros_like(p, requires_grad=True)
    try:
        fresh = type(opt)([stand_in], **options)
        stand_in.grad = torch.zeros_like(p)
        with torch.no_grad():
            fresh.step()
    except Exception:
        return {}
    return dict(fresh.state.get(stand_in, {}))


def _as_torch_value(value: Any, like: Any, device: torch.device) -> Any:
    """`value` (detached) in the type torch keeps `like` in; a tensor on `device` otherwise."""
    if isinstance(like, torch.Tensor):
        if isinstance(value, torch.Tensor):
            return value.detach().to(dtype=like.dtype, device=like.device, copy=True)
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if isinstance(value, torch.Tensor):
        return value.detach().clone().to(device)
    if isinstance(value, int) and like is None:  # a step count torch has not shown a type for
        return torch.tensor(float(value), dtype=_scalar_dtype())
    return value


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _device_of(value: Any) -> torch.device:
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _replaced(value: Any, memo: dict[int, Any]) -> Any:
    """`value` with the tensors found in `memo` replaced, through dicts, lists and tuples."""

    def swap(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return memo.get(id(x), x)
        if isinstance(x, defaultdict):  # a leaf to torch's pytree before torch 2.2
            return defaultdict(x.default_factory, {k: _replaced(v, memo) for k, v in x.items()})
        return x

    return pytree.tree_map(swap, value)
