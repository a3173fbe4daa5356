"""The step protocol's phases over an optimizer: `plan` (check, gather; changes nothing) and
`commit` (store; the only phase that changes it), the gradients a step takes, and the
per-instance step driver. Public through `higher.optim.internal`."""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.overrides import has_torch_function

from ._errors import ArgumentTypeError, OptimError
from ._options import validated_options
from ._protocols import GradCallback
from ._shell import OptimizerShell, StepDriver
from ._state import detach_state
from ._step import Bucket, StepPlan, StepResult

#: the optimizer `set_step_driver` hands to its driver
_Shell = TypeVar("_Shell", bound=OptimizerShell)

#: the `step` that consults the driver (a class that overrides it would not)
_DRIVEN_STEP = ("higher.optim._base", "DifferentiableOptimizer.step")


def set_step_driver(diffopt: _Shell, driver: StepDriver[_Shell] | None) -> None:
    """Hand `diffopt.step` to `driver` (None: back to the optimizer's own step).

    A driver runs the step protocol its own way (a memory mode of `higher.innerloop_ctx` does);
    the optimizer's class and every other method stay as they are. An optimizer whose class
    overrides `step` cannot be driven: its `step` would not consult the driver.

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> internal.set_step_driver(diffopt, lambda d, loss, *rest: ["driven"])
        >>> diffopt.step(w.sum(), params=[w]), type(diffopt).__name__
        (['driven'], 'DifferentiableSGD')
        >>> internal.set_step_driver(diffopt, None)
    """
    step = type(diffopt).step
    if driver is not None and (step.__module__, step.__qualname__) != _DRIVEN_STEP:
        raise OptimError(
            f"{type(diffopt).__name__} overrides step, so a step driver would never run: "
            "drive it through its own step"
        )
    if driver is None:
        diffopt.__dict__.pop("_step_driver", None)
    else:
        diffopt._step_driver = driver


def step_driver(diffopt: _Shell) -> StepDriver[_Shell] | None:
    """The driver `diffopt.step` hands over to (None: its own step).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.1), [w])
        >>> print(internal.step_driver(diffopt))
        None
    """
    driver: StepDriver[_Shell] | None = diffopt._step_driver
    return driver


# -- the parameters and gradients of a step ---------------------------------------------------


def current_params(
    opt: OptimizerShell, params: Iterable[torch.Tensor] | None
) -> list[torch.Tensor]:
    """`params` as a list, or the functional model's fast weights."""
    if params is not None:
        return params if isinstance(params, list) else list(params)
    if opt.fmodel is None:
        raise OptimError(
            "step() needs the current parameters: pass params=[...] or build the "
            "optimizer with fmodel="
        )
    fast = opt.fmodel.fast_params
    if fast is None:
        raise OptimError("the functional model has no fast weights; pass params=[...]")
    return list(fast)


def check_step_params(opt: OptimizerShell, params: list[torch.Tensor]) -> None:
    """Refuse parameters of the wrong count, type, shape or dtype."""
    specs = opt._specs
    if len(params) == len(specs):
        try:
            if all(
                p.shape == shape and p.dtype == dtype for p, (shape, dtype) in zip(params, specs)
            ):
                return
        except AttributeError:  # not a tensor: said below
            pass
    reference = opt._reference
    if len(params) != len(reference):
        raise OptimError(
            f"step got {len(params)} parameters; expected {len(reference)} "
            "(one per reference parameter, in the same order)"
        )
    for i, (p, ref) in enumerate(zip(params, reference, strict=True)):
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


def gradients(
    opt: OptimizerShell,
    loss: torch.Tensor,
    params: list[torch.Tensor],
    create_graph: bool | None,
    grad_callback: GradCallback | None,
) -> list[torch.Tensor | None]:
    """`opt.gradients(...)` for parameters not checked yet."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise OptimError(f"the loss must be a scalar tensor (one element), got {shape}")
    check_step_params(opt, params)
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(params)
    if trainable:
        if not loss.requires_grad:
            raise OptimError(
                "the loss does not require grad, so it does not depend on the parameters; "
                "compute it from the parameters given to step (or the functional model)"
            )
        found = loss_grads(
            loss,
            tuple(params[i] for i in trainable),
            opt.track_higher_grads if create_graph is None else create_graph,
        )
        if all(g is None for g in found):
            raise OptimError(_unrelated_loss(opt, loss, params))
        for i, grad in zip(trainable, found, strict=True):
            grads[i] = grad
    callback = grad_callback if grad_callback is not None else opt.grad_callback
    return grads if callback is None else _called_back(callback, grads)


#: the autograd engine's entry point that `torch.autograd.grad` ends in (the first name since
#: torch 2.3, which keeps torch's logging hooks and context; the second before)
_RUN_BACKWARD: Callable[..., tuple[torch.Tensor | None, ...]] = getattr(
    torch.autograd.graph,
    "_engine_run_backward",
    torch.autograd.Variable._execution_engine.run_backward,
)


def loss_grads(
    loss: torch.Tensor, inputs: tuple[torch.Tensor, ...], create_graph: bool
) -> tuple[torch.Tensor | None, ...]:
    """`torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)`.

    For a plain tensor loss and plain tensor inputs (the inner loop's case) it calls the engine
    as `torch.autograd.grad` does, without the argument handling around that call (about 25 us
    a step on a CPU, a tenth of a small MLP's step); anything else (a tensor subclass with
    `__torch_function__`, a loss that does not require grad) goes through
    `torch.autograd.grad` itself, with its checks and messages.
    """
    if (
        type(loss) is torch.Tensor
        and loss.requires_grad
        and not has_torch_function(inputs)
        and not torch.overrides.has_torch_function_unary(loss)
    ):
        one = torch.ones_like(loss, memory_format=torch.preserve_format)  # fresh: never shared
        return _RUN_BACKWARD((loss,), (one,), create_graph, create_graph, inputs, True, False)
    return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)


def _unrelated_loss(opt: OptimizerShell, loss: torch.Tensor, params: list[torch.Tensor]) -> str:
    """Why a loss that requires grad depends on none of the step's parameters."""
    what = "the parameters given to step" if opt.fmodel is None else "the fast weights"
    suspects = [("the original model's parameters", opt._reference)]
    history = getattr(opt.fmodel, "parameters", None)
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


def _called_back(
    callback: GradCallback, grads: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    returned = callback(grads)
    if not isinstance(returned, (list, tuple)):
        raise OptimError(
            "grad_callback must return a list of gradients (one per parameter, None "
            f"where there is none), got {type(returned).__name__}"
        )
    if len(returned) != len(grads):
        raise OptimError(f"grad_callback returned {len(returned)} gradients; expected {len(grads)}")
    return list(returned)


def closure_loss(
    loss: torch.Tensor | None, closure: Callable[[], torch.Tensor] | None
) -> torch.Tensor:
    """The loss `step` was given, or its closure's (run with grad enabled)."""
    if closure is None:
        raise OptimError("step needs the loss: step(loss) or step(closure=lambda: loss_fn(...))")
    if loss is not None:
        raise OptimError("give step either the loss or a closure that computes it, not both")
    if not callable(closure):
        raise ArgumentTypeError(f"closure must be callable, got {type(closure).__name__}")
    with torch.enable_grad():
        return closure()


# -- plan -------------------------------------------------------------------------------------


def plan(
    diffopt: OptimizerShell,
    params: Iterable[torch.Tensor] | None = None,
    *,
    stepped: Sequence[bool] | None = None,
    override: Mapping[str, Sequence[Any]] | None = None,
    **kwargs: Any,
) -> StepPlan:
    """Check one step of `diffopt` and gather what it needs; nothing is changed.

    Args:
        diffopt: the optimizer to step.
        params: the current parameters, in the order of `reference_params` (default: the
            functional model's fast weights).
        stepped: per parameter, whether it is updated (default: whether it requires grad);
            a parameter the loss does not use has no gradient and is not stepped.
        override: hyperparameters for this step and, once committed, the later ones.
        **kwargs: passed to a hand-written `_update`.

    Returns:
        A `StepPlan` bound to `diffopt` as it is now: run it with `plan.update(params, grads)`,
        then `commit` the result (before any other step of `diffopt`).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> plan = internal.plan(diffopt, [w], override={"lr": [0.25]})
        >>> result = plan.update([w], [torch.ones(2)])
        >>> internal.commit(diffopt, plan, result)[0].tolist(), diffopt.param_groups[0]["lr"]
        ([0.75, 0.75], 0.25)
    """
    param_list = current_params(diffopt, params)
    check_step_params(diffopt, param_list)
    return checked_plan(diffopt, param_list, stepped, override, kwargs)


def checked_plan(
    opt: OptimizerShell,
    param_list: list[torch.Tensor],
    stepped: Sequence[bool] | None,
    override: Mapping[str, Sequence[Any]] | None,
    kwargs: dict[str, Any],
) -> StepPlan:
    """`plan` for parameters already checked."""
    options = opt.param_groups if override is None else validated_options(opt, override)
    if stepped is None:
        stepped = [p.requires_grad for p in param_list]
    elif len(stepped) != len(param_list):
        raise OptimError(
            f"stepped has {len(stepped)} entries; expected {len(param_list)} (one per parameter)"
        )
    live = [[bool(stepped[i]) for i in mapping] for mapping in opt._group_to_param_list]
    made: StepPlan = opt._make_plan(param_list, live, options, kwargs)
    # (bound to `opt`: `_replace` costs more than the rebuild)
    return StepPlan(*made[:-2], opt._identity, opt._version)


def hand_written_plan(
    opt: OptimizerShell,
    params: list[torch.Tensor],
    live: list[list[bool]],
    options: list[dict[str, Any]],
    kwargs: dict[str, Any],
) -> StepPlan:
    """A plan that runs a hand-written `_update` (one bucket per group) on copies."""
    buckets = []
    for g, (flags, mapping) in enumerate(zip(live, opt._group_to_param_list, strict=True)):
        slots = tuple(j for j, flag in enumerate(flags) if flag)
        if slots:
            states = [dict(opt.state[g].get(j, ())) for j in slots]
            indices = tuple(mapping[j] for j in slots)
            buckets.append(Bucket(g, slots, indices, states, options[g]))
    requires_grad = [p.requires_grad for p in params]
    return StepPlan(
        buckets, options, requires_grad, None, _HandWritten(opt, kwargs), type(opt).__name__
    )


class _HandWritten:
    """Runs `opt._update` on a scratch view of `opt` (its own param groups and state): the
    optimizer itself is not touched, so the update is pure."""

    def __init__(self, opt: OptimizerShell, kwargs: dict[str, Any]) -> None:
        self.opt, self.kwargs = opt, kwargs

    def __call__(
        self,
        plan: StepPlan,
        params: Sequence[torch.Tensor],
        grads: list[torch.Tensor | None],
        states: list[Any],
    ) -> StepResult:
        opt, mappings = self.opt, self.opt._group_to_param_list
        groups = [
            {**options, "params": [params[i] for i in mapping]}
            for options, mapping in zip(plan.options, mappings, strict=True)
        ]
        state = [defaultdict(dict, {j: dict(s) for j, s in gs.items()}) for gs in opt.state]
        for bucket, bucket_states in zip(plan.buckets, states, strict=True):
            for j, slot in zip(bucket.slots, bucket_states, strict=True):
                state[bucket.group][j] = dict(slot)
        stepped = {i for bucket in plan.buckets for i in bucket.indices}
        grouped = [[grads[i] if i in stepped else None for i in mapping] for mapping in mappings]
        scratch = object.__new__(type(opt))
        scratch.__dict__.update(opt.__dict__, param_groups=groups, state=state)
        scratch._update(grouped, **self.kwargs)
        new_params = list(params)
        for group, mapping in zip(groups, mappings, strict=True):
            for j, i in enumerate(mapping):
                new_params[i] = group["params"][j]
        new_states = [[state[b.group][j] for j in b.slots] for b in plan.buckets]
        return StepResult(new_params, new_states)


# -- one uncommitted step ---------------------------------------------------------------------


# -- a step that repeats the last one's signature --------------------------------------------


class Repeat:
    """What a step of `diffopt.step(loss)` leaves for the next: the fast weights it committed
    and the plan it ran, valid while nothing but such steps changes the optimizer, its options
    or the functional model's weights. The next step then skips the checks and the planning
    (validation once per signature), and runs and commits the same way."""

    __slots__ = (
        "options",
        "params",
        "pending",
        "plan",
        "requires_grad",
        "stepped",
        "trainable",
        "version",
    )

    def __init__(
        self,
        opt: OptimizerShell,
        plan: StepPlan,
        stepped: Sequence[bool],
        new_params: list[torch.Tensor],
    ) -> None:
        self.params = new_params
        self.requires_grad = [p.requires_grad for p in new_params]
        self.trainable = tuple(i for i, flag in enumerate(self.requires_grad) if flag)
        self.stepped = list(stepped)
        self.plan = plan
        self.options = _options_key(opt.param_groups)
        self.version = opt._version
        #: the plan `repeat_plan` last returned from this one (its commit updates this in place)
        self.pending: StepPlan | None = None


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _options_key(groups: list[dict[str, Any]]) -> tuple[Any, ...]:
    """The param groups' options as they are: per group, its keys, its values, and the items
    of its list values (a per-parameter `lr`). A key whose entries are the very same objects
    (`is`) means the very same options (`_same_options`). The key holds the values, so an
    identity cannot be reused by another object while it is kept. `params` is left out: a step
    writes it (`load_params`) and never reads it, so the key of a step's groups is still the
    key after its commit."""
    return tuple(_group_key(group) for group in groups)


def _group_key(group: dict[str, Any]) -> tuple[tuple[str, ...], tuple[Any, ...], Any]:
    names = tuple(group)
    values = _option_values(group, names)
    # each list value (a per-parameter `lr`): its place among the values and its items
    lists = tuple((i, tuple(v)) for i, v in enumerate(values) if type(v) is list)
    return names, values, lists


def _option_values(group: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    """The group's values but `params`, in order (`names`: the group's keys)."""
    values = tuple(group.values())
    if names and names[-1] == "params":  # where the twins put it (torch: first)
        return values[:-1]
    if names and names[0] == "params":
        return values[1:]
    if "params" in group:
        return tuple(v for k, v in group.items() if k != "params")
    return values


def _same_options(groups: list[dict[str, Any]], kept: tuple[Any, ...]) -> bool:
    """Whether `groups` hold the very options `kept` (an `_options_key`) holds: the same keys
    and values (`is`), and the same items in their list values."""
    if len(groups) != len(kept):
        return False
    for group, (names, values, lists) in zip(groups, kept, strict=True):
        if len(group) != len(names) or not all(map(operator.is_, group, names)):
            return False
        if names and names[-1] == "params":  # where the twins put it: the values before it
            if not all(map(operator.is_, group.values(), values)):  # (`params` not reached)
                return False
        else:  # a group laid out by hand
            now = _option_values(group, names)
            if len(now) != len(values) or not all(map(operator.is_, now, values)):
                return False
        for i, items in lists:  # the very lists (the values are): their items set in place?
            value = values[i]
            if len(value) != len(items) or not all(map(operator.is_, value, items)):
                return False
    return True


def repeat_plan(
    diffopt: OptimizerShell, params: Sequence[torch.Tensor], stepped: Sequence[bool] | None = None
) -> StepPlan | None:
    """The plan of a step with the signature of the last one `remember` kept: its plan, its
    checks reused, with the buckets' current state. None where anything differs (then `plan`):
    `params` are not the very tensors that step committed, their `requires_grad` or the
    parameters `stepped` differ, the param groups' options are not the same objects (a
    per-parameter `lr` list item by item), or the optimizer changed since (a step, commit or
    `load_state_dict` that did not remember, a state field set by hand).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> class Weights:  # a functional model: its fast weights, and their update
        ...     def __init__(self) -> None:
        ...         self.fast_params = [torch.ones(2, requires_grad=True)]
        ...     def update_params(self, params: list[torch.Tensor]) -> None:
        ...         self.fast_params = list(params)
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w],
        ...                                       fmodel=Weights())
        >>> current = diffopt.fmodel.fast_params
        >>> plan = internal.plan(diffopt, current)
        >>> new = internal.commit(diffopt, plan, plan.update(current, [torch.ones(2)]))
        >>> internal.remember(diffopt, plan, [True], new)
        >>> again = internal.repeat_plan(diffopt, new, [True])
        >>> again is not None, internal.repeat_plan(diffopt, current, [True])
        (True, None)
    """
    last: Repeat | None = diffopt._repeat
    if last is None or last.version != diffopt._version or len(params) != len(last.params):
        return None
    if not all(map(operator.is_, params, last.params)):
        return None
    if list(map(_REQUIRES_GRAD, params)) != last.requires_grad or not last.trainable:
        return None
    if stepped is not None and list(stepped) != last.stepped:
        return None
    if not _same_options(diffopt.param_groups, last.options):
        return None
    last.pending = diffopt._repeat_plan(last.plan)
    return last.pending


def remember(
    diffopt: OptimizerShell, plan: StepPlan, stepped: Sequence[bool], new_params: list[torch.Tensor]
) -> None:
    """After `commit(diffopt, plan, ...)` returned `new_params`: keep what `repeat_plan` reuses
    for the next step with this signature (a functional model's steps, rule-based twins; the
    example of `repeat_plan` has one).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> plan = internal.plan(diffopt, [w])
        >>> new = internal.commit(diffopt, plan, plan.update([w], [torch.ones(2)]))
        >>> internal.remember(diffopt, plan, [True], new)  # no functional model: nothing kept
        >>> internal.repeat_plan(diffopt, new) is None
        True
    """
    if plan.fallback is not None or diffopt.fmodel is None:
        return
    last: Repeat | None = diffopt._repeat
    if last is not None and last.pending is plan and list(stepped) == last.stepped:
        # the plan repeat_plan gave: the same signature, only what the step changed
        last.params, last.plan, last.version = new_params, plan, diffopt._version
        last.pending = None
        if plan.options is not diffopt.param_groups:  # commit wrote the step's override
            last.options = _options_key(diffopt.param_groups)
    else:
        diffopt._repeat = Repeat(diffopt, plan, stepped, new_params)


def repeat_step(diffopt: OptimizerShell, loss: torch.Tensor) -> list[torch.Tensor] | None:
    """`diffopt.step(loss)` when the last step left a `Repeat` that still holds: the gradients,
    the last plan with the buckets' current state, the update, `commit`. None (nothing done)
    when it does not hold: the caller takes the whole step."""
    last: Repeat | None = diffopt._repeat
    if last is None or diffopt.grad_callback is not None:
        return None
    fmodel = diffopt.fmodel
    if fmodel is None or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return None
    fast = fmodel.fast_params
    if fast is None or loss.numel() != 1:
        return None
    current = fast if isinstance(fast, list) else list(fast)
    plan = repeat_plan(diffopt, current)
    if plan is None:
        return None
    trainable = last.trainable
    if len(trainable) == len(current):  # every parameter (the usual case): no gather, no scatter
        grads: list[torch.Tensor | None] = list(
            loss_grads(loss, tuple(current), diffopt.track_higher_grads)
        )
    else:
        found = loss_grads(loss, tuple(current[i] for i in trainable), diffopt.track_higher_grads)
        grads = [None] * len(current)
        for i, grad in zip(trainable, found, strict=True):
            grads[i] = grad
    stepped = list(map(operator.is_not, grads, itertools.repeat(None)))
    repeated = stepped == last.stepped
    if not repeated:  # another set of parameters is stepped: planned anew
        if not any(stepped):
            raise OptimError(_unrelated_loss(diffopt, loss, current))
        plan = checked_plan(diffopt, current, stepped, None, {})
    new_params = commit(diffopt, plan, plan.run(current, grads))
    remember(diffopt, plan, stepped, new_params)
    return new_params


def compute_step(
    diffopt: OptimizerShell,
    loss: torch.Tensor,
    params: Iterable[torch.Tensor] | None = None,
    *,
    create_graph: bool | None = None,
    grad_callback: GradCallback | None = None,
    override: Mapping[str, Sequence[Any]] | None = None,
    update_kwargs: Mapping[str, Any] | None = None,
) -> tuple[StepPlan, list[torch.Tensor | None], StepResult]:
    """One step of `diffopt` from a loss computed at `params`, not committed: its gradients
    (after the grad_callback), the plan of the parameters they step, and the update's result.
    `diffopt.step(loss)` is this, then `commit`; a memory mode runs it, then commits its own
    way. Nothing is changed.

    Args:
        diffopt: the optimizer to step.
        loss: a scalar tensor computed from `params`.
        params: the current parameters (default: the functional model's fast weights).
        create_graph: keep the gradients' graph (default: `track_higher_grads`).
        grad_callback: `grads -> grads`; wins over the optimizer's.
        override: hyperparameters for this step and, once committed, the later ones.
        update_kwargs: passed to a hand-written `_update` (`diffopt.step`'s `**kwargs`).

    Returns:
        `(plan, grads, result)`: commit `result` with `commit(diffopt, plan, result)`.

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> plan, grads, result = internal.compute_step(diffopt, (w**2).sum(), [w])
        >>> grads[0].tolist(), result.params[0].tolist()
        ([2.0, 2.0], [0.0, 0.0])
        >>> internal.commit(diffopt, plan, result)[0].tolist()
        [0.0, 0.0]
    """
    param_list = current_params(diffopt, params)
    grads = gradients(diffopt, loss, param_list, create_graph, grad_callback)
    stepped = [g is not None for g in grads]
    made = checked_plan(diffopt, param_list, stepped, override, dict(update_kwargs or {}))
    called_back = grad_callback is not None or diffopt.grad_callback is not None
    if called_back or any(g is not None and g.is_sparse for g in grads):
        return made, grads, made.update(param_list, grads)  # checked: not autograd's own
    return made, grads, made.run(param_list, grads)


# -- commit -----------------------------------------------------------------------------------


def commit(
    diffopt: OptimizerShell,
    plan: StepPlan,
    result: StepResult,
    *,
    first_order: bool | None = None,
) -> list[torch.Tensor]:
    """Store a step's outcome: the new parameters (into the functional model, when there is
    one), the new state, and the step's override. Returns the new parameters.

    `plan` must come from `plan(diffopt, ...)` with no step, commit or `load_state_dict` of
    `diffopt` since: a plan of another optimizer, a stale one or one committed already is
    refused (`OptimError`), and `diffopt` stays as it was.

    Args:
        diffopt: the optimizer that made `plan`.
        plan: the plan `result` came from.
        result: what `plan.update` returned.
        first_order: detach the new parameters and the state, each keeping its
            `requires_grad` (default: when `diffopt` does not track higher-order gradients,
            or grad mode is disabled).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> plan = internal.plan(diffopt, [w])
        >>> internal.commit(diffopt, plan, plan.update([w], [torch.ones(1)]))[0].item()
        0.5
    """
    _check_bound(diffopt, plan)
    if first_order is None:  # no graph is kept without tracking, or with grad disabled
        first_order = not (diffopt.track_higher_grads and torch.is_grad_enabled())
    new_params = result.params
    if first_order:
        new_params = [
            q.detach().requires_grad_(r)
            for q, r in zip(new_params, plan.requires_grad, strict=True)
        ]
    if diffopt.fmodel is not None:  # the one write that checks: first, so a refusal changes nothing
        diffopt.fmodel.update_params(new_params)
    diffopt._version += 1
    for group, options in zip(diffopt.param_groups, plan.options, strict=True):
        if options is not group:
            group.update((k, v) for k, v in options.items() if k != "params")
    for bucket, new_state in zip(plan.buckets, result.states, strict=True):
        diffopt._store_state(bucket, new_state)
    if first_order:
        for group_state in diffopt.state:
            detach_state(group_state)
    load_params(diffopt, new_params)
    return new_params


def _check_bound(opt: OptimizerShell, plan: StepPlan) -> None:
    """Refuse a plan that `opt` did not make, or made from a state it has moved on from."""
    if plan.owner is not opt._identity:
        made_by = "no optimizer's plan()" if plan.owner is None else "another optimizer"
        raise OptimError(
            f"commit got a plan made by {made_by} (a {plan.name} step), not by this "
            f"{type(opt).__name__}: commit a plan into the optimizer whose plan() made it, "
            "then make a new plan for the next step"
        )
    if plan.version != opt._version:
        raise OptimError(
            f"commit got a stale plan: this {type(opt).__name__} has changed since the plan was "
            f"made (a step, a commit or load_state_dict; {opt._version - plan.version} since), "
            "so committing it "
            "would store a step from an old state or store one step twice; make a new plan "
            "from the current state and commit each plan once"
        )


def load_params(opt: OptimizerShell, params: list[torch.Tensor]) -> None:
    """Put `params` (in the order of `reference_params`) into the groups' slots."""
    for group, mapping in zip(opt.param_groups, opt._group_to_param_list, strict=True):
        group["params"] = [params[i] for i in mapping]
