"""Batched tasks: the ordinary inner loop, run for many tasks at once.

`innerloop_ctx(model, opt, tasks=T)` (and its alias `batched_innerloop_ctx`) yields a
`BatchedModule` (fast weights with a leading task dimension, a forward over every task) and a
`BatchedOptimizer` (the twin of `opt`, whose update rule runs per task under vmap through the
step protocol). One step of the batched loop computes what `T` separate inner loops compute,
task for task. `per_task_update` runs a rule once per task under vmap (the compiled meta-step's
task steps use it too).

The forward runs in one of two ways (`batching=`): "vmap", one forward vmapped over tasks, or
"loop", one forward per task on its slices of the stacked weights (`unbind`), the outputs
stacked. They compute the same values; which is faster depends on the model and the device. On
a CPU, vmap's batched convolutions (grouped, in batched layouts) made the conv net of the peer
benchmark 1.3x slower than the loop, while small MLPs gain several times from vmap, so "auto"
takes the loop for a model with convolution layers on a CPU and vmap otherwise, and logs which
at DEBUG on the `higher` logger.

Why the gradients are exact: task `t`'s loss depends on task `t`'s slice of the stacked weights
only, so the gradient of the losses' sum with respect to the stacked weights is, slice by slice,
each task's own gradient (plain autograd through the vmapped forward or through `unbind`, to any
order). `vmap(grad(...))`, the other way round, is not used: its second-order gradient through
batch statistics (BatchNorm in training mode) was measured wrong on torch 2.13.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from higher._engine import fresh_buffers
from higher._errors import FastPathError
from higher._strategies import refuse_hand_written
from higher._trees import flatten, merge_fields, split_fields, unflatten
from higher.optim import DifferentiableOptimizer, get_diff_optim, internal
from higher.optim import FunctionalModel as FunctionalModel
from higher.optim.internal import Bucket, StepPlan, StepResult
from higher.patch import FunctionalModule, monkeypatch

Params = Sequence[torch.Tensor]

#: how a batched model's forward can run over its tasks (`batching=`)
BATCHINGS = ("auto", "vmap", "loop")
#: the layers whose batched form under vmap is slower than a loop over tasks on a CPU
_CONVOLUTIONS = (
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
)  # fmt: skip
_LOG = logging.getLogger("higher")


class BatchedModule:
    """A functional model for `tasks` tasks at once: each fast weight (and buffer) carries a
    leading task dimension, and a call runs the model's forward for every task, vmapped or in a
    loop over tasks (`batching`). Made by `higher.innerloop_ctx(..., tasks=T)`.

    Positional tensor arguments carry the task dimension first (`x[t]` is task `t`'s input);
    keyword arguments and non-tensor arguments are shared by every task. Buffers (BatchNorm's
    running statistics) are one per task, updated as each task's own copy would be. Random ops
    (dropout) draw independently per task (`randomness="different"`), or the same for every
    task ("same").

    Examples:
        >>> net = torch.nn.Linear(3, 1)
        >>> with higher.batched_innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1),
        ...                                   tasks=4) as (fmodel, diffopt):
        ...     out = fmodel(torch.ones(4, 10, 3))
        >>> out.shape, fmodel.fast_params[0].shape
        (torch.Size([4, 10, 1]), torch.Size([4, 1, 3]))
    """

    def __init__(
        self,
        module: FunctionalModule,
        tasks: int,
        randomness: str,
        anchored: bool,
        batching: str = "vmap",
    ) -> None:
        self._module = module
        self._tasks = tasks
        self._randomness = randomness
        self._batching = batching
        named = module.named_fast_params()
        self._names = tuple(named)
        self._specs = [(p.shape, p.dtype, p.device) for p in named.values()]
        self._track = module.track_higher_grads
        initial = [p.expand(tasks, *p.shape) for p in named.values()]
        # With copy_initial_weights=False and first-order steps: what gradients pass through.
        self._anchor = initial if anchored and not self._track else None
        self._history: list[list[torch.Tensor]] = [initial]
        buffers = dict(module.named_buffers())
        self._buffer_names = tuple(buffers)
        self._buffers = [b.unsqueeze(0).repeat(tasks, *[1] * b.dim()) for b in buffers.values()]

    # ---- calling -----------------------------------------------------------------------------

    def __call__(self, *args: Any, params: Params | None = None, **kwargs: Any) -> Any:
        """Run the forward of every task: positional tensors carry the task dimension first."""
        if params is not None:
            self.update_params(params)
        refuse_nested(args, kwargs)
        in_dims: list[int | None] = [0, 0]
        for k, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                if arg.dim() == 0 or arg.shape[0] != self._tasks:
                    raise FastPathError(
                        f"positional argument {k} has shape {tuple(arg.shape)}; a batched model "
                        f"takes one input per task, shape ({self._tasks}, ...): pass a tensor "
                        "shared by every task as a keyword argument, or expand it"
                    )
                in_dims.append(0)
            else:
                in_dims.append(None)
        module, names, buffer_names = self._module, self._names, self._buffer_names

        def one(params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], *xs: Any) -> Any:
            tensors = {**dict(zip(names, params)), **dict(zip(buffer_names, buffers))}
            return torch.func.functional_call(module, tensors, xs, kwargs)

        # the forward updates new buffers in place, never those an earlier step saved
        buffers = list(fresh_buffers(self.named_buffers()).values())
        if self._batching == "loop":
            out = self._loop(one, buffers, args, in_dims[2:])
        else:
            run = torch.func.vmap(one, in_dims=tuple(in_dims), randomness=self._randomness)
            out = run(self._history[-1], buffers, *args)
        self._buffers = buffers
        return out

    def _loop(
        self,
        one: Callable[..., Any],
        buffers: list[torch.Tensor],
        args: tuple[Any, ...],
        dims: list[int | None],
    ) -> Any:
        """`one` per task on its slices (`unbind`: one autograd node per stacked tensor, whose
        backward stacks the tasks' gradients), the outputs stacked; `dims`: vmap's in_dims of
        `args` (0: one per task, None: shared)."""
        params = [p.unbind(0) for p in self._history[-1]]
        states = [b.unbind(0) for b in buffers]  # views: the forward's updates land in buffers
        inputs = [None if d is None else a.unbind(0) for a, d in zip(args, dims)]
        replay = _Replay(self._history[-1]) if self._randomness == "same" else None
        outs = []
        for t in range(self._tasks):
            if replay is not None and t:
                replay.rewind()  # every task draws what the first drew
            xs = [a if x is None else x[t] for a, x in zip(args, inputs)]
            outs.append(one([p[t] for p in params], [b[t] for b in states], *xs))
        return stack_outputs(outs)

    # ---- fast weights ------------------------------------------------------------------------

    @property
    def tasks(self) -> int:
        """The number of tasks (the size of every fast weight's leading dimension)."""
        return self._tasks

    @property
    def batching(self) -> str:
        """How the forward runs over the tasks: "vmap" or "loop" (what `batching="auto"` chose).

        Examples:
            >>> conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
            >>> opt = torch.optim.SGD(conv.parameters(), lr=0.1)
            >>> with higher.batched_innerloop_ctx(conv, opt, tasks=2) as (fmodel, _):
            ...     fmodel.batching
            'loop'
        """
        return self._batching

    @property
    def fast_params(self) -> list[torch.Tensor]:
        """The current fast weights, each of shape `(tasks, *parameter shape)`."""
        return list(self._history[-1])

    def parameters(self, time: int | None = None) -> Iterator[torch.Tensor]:
        """Iterate over the stacked fast weights at step `time` (the latest by default).

        Examples:
            >>> net = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> with higher.batched_innerloop_ctx(net, opt, tasks=3) as (fmodel, diffopt):
            ...     _ = diffopt.step(torch.vmap(lambda y: y.pow(2).sum())(
            ...         fmodel(torch.ones(3, 5, 2))))
            >>> [p.shape[0] for p in fmodel.parameters(time=1)]
            [3, 3]
        """
        return iter(self._at(time))

    def named_fast_params(self, time: int | None = None) -> dict[str, torch.Tensor]:
        """The stacked fast weights at step `time` by parameter name."""
        return dict(zip(self._names, self._at(time)))

    def named_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers, one per task (leading dimension), by name."""
        return dict(zip(self._buffer_names, self._buffers))

    def _at(self, time: int | None) -> list[torch.Tensor]:
        if time is None:
            return self._history[-1]
        n = len(self._history)
        if isinstance(time, bool) or not isinstance(time, int) or not -n <= time < n:
            raise FastPathError(
                f"time={time!r} is not available: {n} step(s) kept (valid times {-n}..{n - 1}"
                + ("" if self._track else "; with track_higher_grads=False only the latest")
                + ")"
            )
        return self._history[time]

    def update_params(self, params: Params) -> None:
        """Make `params` (one stacked tensor per parameter) the current fast weights."""
        checked = self._check(params)
        if self._track:
            self._history.append(checked)
        else:
            if self._anchor is not None:  # first order: gradients pass to the initial weights
                checked = [
                    q.detach() + (a - a.detach()) if a.requires_grad else q
                    for q, a in zip(checked, self._anchor)
                ]
            self._history = [checked]

    def _check(self, params: Params) -> list[torch.Tensor]:
        params = list(params)
        if len(params) != len(self._specs):
            raise FastPathError(
                f"got {len(params)} fast weights; expected {len(self._specs)} (one per "
                f"parameter: {', '.join(self._names)})"
            )
        for i, (p, (shape, dtype, device)) in enumerate(zip(params, self._specs)):
            want = (self._tasks, *shape)
            if not isinstance(p, torch.Tensor) or p.shape != want:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise FastPathError(
                    f"fast weight {i} ({self._names[i]}) is {got}; expected shape {want}: the "
                    "parameter's shape with the task dimension first"
                )
            if p.dtype != dtype or p.device != device:
                raise FastPathError(
                    f"fast weight {i} ({self._names[i]}) is {p.dtype} on {p.device}; expected "
                    f"{dtype} on {device}"
                )
        return params

    @property
    def track_higher_grads(self) -> bool:
        """Whether every step's fast weights are kept (for higher-order gradients)."""
        return self._track

    # ---- modes -------------------------------------------------------------------------------

    @property
    def module(self) -> FunctionalModule:
        """The functional copy of the model whose forward each task runs (set its modes here)."""
        return self._module

    def train(self, mode: bool = True) -> BatchedModule:
        """Set training mode (as `torch.nn.Module.train`) on the model every task runs."""
        self._module.train(mode)
        return self

    def eval(self) -> BatchedModule:
        """Set evaluation mode on the model every task runs."""
        return self.train(False)


class BatchedOptimizer:
    """The differentiable twin of a torch optimizer, stepping every task of a `BatchedModule`.

    `step(losses)` takes `losses` of shape `(tasks,)`, one per task (`torch.vmap` of a loss
    function over the model's output gives them), and runs the twin's update rule once per
    task under `torch.func.vmap` (the step protocol's pure `StepPlan.update`): a
    `grad_callback` such as `higher.optim.clip_grad_norm` sees one task's gradients at a time.
    The state (`state`, `param_groups`) is the twin's, its tensors stacked per task.
    Hyperparameters are shared by every task (tensors in `override` learnable as usual).
    Made by `higher.innerloop_ctx(..., tasks=T)`.

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> with higher.batched_innerloop_ctx(net, opt, tasks=3) as (fmodel, diffopt):
        ...     losses = torch.vmap(lambda y: y.pow(2).mean())(fmodel(torch.randn(3, 5, 2)))
        ...     _ = diffopt.step(losses)
        >>> diffopt.state[0][0]["exp_avg"].shape
        torch.Size([3, 1, 2])
    """

    def __init__(
        self, twin: DifferentiableOptimizer, fmodel: BatchedModule, templates: list[torch.Tensor]
    ) -> None:
        self._twin = twin
        self._fmodel = fmodel
        # per-task shaped stand-ins for `plan`: it checks shapes and makes fresh states of them
        self._templates = templates
        # (group, slot) of the slots stepped here: their state is stacked per task (before their
        # first step it is the torch optimizer's, or fresh, one for every task)
        self._stepped: set[tuple[int, int]] = set()
        # whether a step saw losses that do not couple the tasks (checked on the first step:
        # the check syncs with the device)
        self._uncoupled = False
        refuse_hand_written(internal.plan(twin, templates), twin, "batched tasks", FastPathError)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The twin's param groups (hyperparameters; `params` hold the stacked weights)."""
        return self._twin.param_groups

    @property
    def state(self) -> Any:
        """The twin's state, `state[group][slot]`, its tensors stacked per task."""
        return self._twin.state

    @property
    def fmodel(self) -> BatchedModule:
        """The batched model each step updates."""
        return self._fmodel

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep their graph (False: first order)."""
        return self._twin.track_higher_grads

    def step(
        self,
        loss: torch.Tensor,
        params: Params | None = None,
        override: Mapping[str, Sequence[Any]] | None = None,
        grad_callback: Any = None,
    ) -> list[torch.Tensor]:
        """Take one step of every task on `loss`, shape `(tasks,)` (task `t`'s loss in entry
        `t`, computed from task `t`'s fast weights only). Returns the new stacked weights
        (the batched model is updated to them)."""
        tasks = self._fmodel.tasks
        if not isinstance(loss, torch.Tensor) or loss.shape != (tasks,):
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise FastPathError(
                f"the loss has shape {got}; expected ({tasks},): one loss per task, e.g. "
                "torch.vmap(torch.nn.functional.mse_loss)(fmodel(x), y) (a mean over tasks "
                "would scale each task's gradient by 1/tasks)"
            )
        current = self._fmodel.fast_params if params is None else self._fmodel._check(params)
        trainable = [i for i, p in enumerate(current) if p.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(current)
        if trainable:
            if not loss.requires_grad:
                raise FastPathError(
                    "the loss does not depend on the fast weights: compute it from fmodel(...)"
                )
            weights = [current[i] for i in trainable]
            found = torch.autograd.grad(
                loss,
                weights,
                grad_outputs=torch.ones_like(loss),
                create_graph=self._twin.track_higher_grads,
                retain_graph=True if not self._uncoupled else None,  # for the check below
                allow_unused=True,
            )
            if all(g is None for g in found):
                raise FastPathError(
                    "the loss depends on none of the current fast weights: compute it from "
                    "fmodel(...) after the last step"
                )
            if not self._uncoupled:
                if all(g is None or not g.any() for g in found) and loss.detach().any():
                    refuse_coupled(loss, weights)
                self._uncoupled = True
            for i, g in zip(trainable, found):
                grads[i] = g
        callback = grad_callback if grad_callback is not None else self._twin.grad_callback
        plan = internal.plan(
            self._twin, self._templates, stepped=[g is not None for g in grads], override=override
        )
        result = self._run(plan, current, grads, callback)
        new = internal.commit(self._twin, plan, result)
        self._stepped.update((b.group, j) for b in plan.buckets for j in b.slots)
        return new

    def _dims(self, bucket: Bucket, state: Any) -> list[int | None]:
        """vmap's in_dims of the tensors of a bucket's state, in `flatten`'s order: 0 for a
        slot stepped here before (stacked), None for one that was not (shared by the tasks)."""
        stacked = [(bucket.group, j) in self._stepped for j in bucket.slots]
        dims: list[int | None] = []
        for value in state:
            if isinstance(value, torch.Tensor):
                dims.append(0 if all(stacked) else None)
            elif isinstance(value, (list, tuple)):
                dims.extend(0 if s else None for v, s in zip(value, stacked) if v is not None)
        return dims

    def _run(
        self,
        plan: StepPlan,
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        callback: Any,
    ) -> StepResult:
        """`plan.update` once per task under vmap; nothing is changed yet."""
        assert plan.rule is not None
        shared = frozenset(plan.rule.scalar_state)  # one value for a bucket: kept unstacked
        stepped = [i for b in plan.buckets for i in b.indices]
        n = len(params)

        def one(
            ps: list[torch.Tensor], gs: list[torch.Tensor], states: list[Any]
        ) -> tuple[list[torch.Tensor], list[Any]]:
            full: list[torch.Tensor | None] = [None] * n
            for k, i in enumerate(stepped):
                full[i] = gs[k]
            if callback is not None:
                returned = callback(full)
                if not isinstance(returned, (list, tuple)) or len(returned) != n:
                    raise FastPathError(
                        f"grad_callback must return a list of {n} gradients (None where there "
                        f"is none), got {type(returned).__name__}"
                    )
                full = list(returned)
            result = (plan.update if callback is not None else plan.run)(ps, full, states)
            return [result.params[i] for i in stepped], result.states

        def dims(task_part: list[Any]) -> list[int | None]:
            return [d for b, t in zip(plan.buckets, task_part) for d in self._dims(b, t)]

        try:
            out_params, new_states = per_task_update(
                one, params, _present(grads, stepped), [b.state for b in plan.buckets], shared,
                dims,
            )  # fmt: skip
        except ValueError as err:
            if "out_dims" not in str(err) and "BatchedTensor" not in str(err):
                raise
            raise FastPathError(
                f"{plan.name}'s state fields {sorted(shared)} depend on each task's values; "
                "batched tasks keep them shared: use innerloop_ctx per task"
            ) from err
        new_params = list(params)
        for k, i in enumerate(stepped):
            new_params[i] = out_params[k]
        return StepResult(new_params, new_states)


#: one task's update: `(params, grads, states) -> (new params, new states)`
TaskUpdate = Callable[
    [list[torch.Tensor], list[torch.Tensor], list[Any]], tuple[list[torch.Tensor], list[Any]]
]


def per_task_update(
    update: TaskUpdate,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[Any],
    shared: frozenset[str],
    state_dims: int | Callable[[list[Any]], list[int | None]] | None,
) -> tuple[list[torch.Tensor], list[Any]]:
    """`update` once per task under `torch.func.vmap`: `params` and `grads` carry the task
    dimension first; the state fields named in `shared` (the step count, a rule's scalar state
    such as NAdam's mu_product) are one value for every task, unbatched in and out, and the
    other state tensors are batched along `state_dims` (vmap's in_dims, or a function of the
    task part of the states that gives them leaf by leaf). vmap takes and returns tensors only,
    so the states go through it as flat leaves.

    Examples:
        >>> import collections
        >>> State = collections.namedtuple("State", "step buf")
        >>> def momentum(ps, gs, states):  # one task's step: buf = 0.5 buf + g, p -= buf
        ...     s = states[0]
        ...     buf = 0.5 * s.buf + gs[0]
        ...     return [ps[0] - buf], [State(s.step + 1, buf)]
        >>> new, states = per_task_update(momentum, [torch.ones(3, 2)], [torch.ones(3, 2)],
        ...                               [State(1, torch.ones(3, 2))], frozenset({"step"}), 0)
        >>> new[0][0].tolist(), states[0].step, states[0].buf.shape
        ([-0.5, -0.5], 2, torch.Size([3, 2]))
    """
    task_part, shared_part = split_fields(states, shared)
    task_leaves, task_spec = flatten(task_part)
    shared_leaves, shared_spec = flatten(shared_part)
    specs: dict[str, Any] = {}

    def one(
        ps: list[torch.Tensor],
        gs: list[torch.Tensor],
        tl: list[torch.Tensor],
        sl: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        merged = merge_fields(unflatten(task_spec, tl), unflatten(shared_spec, sl), shared)
        new_ps, new_states = update(ps, gs, merged)
        new_task, new_shared = split_fields(new_states, shared)
        new_tl, specs["task"] = flatten(new_task)
        new_sl, specs["shared"] = flatten(new_shared)
        return new_ps, new_tl, new_sl

    dims = state_dims(task_part) if callable(state_dims) else state_dims
    out_dims: Any = (0, 0, None)  # the shared state fields stay unbatched
    run = torch.func.vmap(one, in_dims=(0, 0, dims, None), out_dims=out_dims)
    new_ps, new_tl, new_sl = run(params, grads, task_leaves, shared_leaves)
    parts = unflatten(specs["task"], new_tl), unflatten(specs["shared"], new_sl)
    return new_ps, merge_fields(*parts, shared)


def refuse_coupled(loss: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """Refuse a loss whose entries couple the tasks, seen by its sign: nonzero losses whose
    gradients are all exactly zero (`l - l.mean()` cancels every task's gradient). Zero
    gradients of uncoupled losses (an optimum, dead units) pass: task 0's loss then reaches
    no other task's weights, which one more backward checks."""
    firsts = torch.autograd.grad(loss[0], weights, retain_graph=True, allow_unused=True)
    if any(g is not None and g[1:].any() for g in firsts):
        raise FastPathError(
            "the losses couple the tasks: task 0's loss depends on other tasks' fast weights "
            "(e.g. l - l.mean()), and every task's gradient came out exactly zero. Entry t of "
            "the loss must be task t's own loss, e.g. torch.vmap(F.mse_loss)(fmodel(x), y); "
            "couple tasks (baselines, normalization) in the outer loss only"
        )


def refuse_nested(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse nested tensors (tasks of unequal sizes): vmap runs every task on one shape."""
    for where, arg in [*((f"positional argument {k}", a) for k, a in enumerate(args)),
                       *((f"keyword argument {k!r}", a) for k, a in kwargs.items())]:  # fmt: skip
        if isinstance(arg, torch.Tensor) and arg.is_nested:
            raise FastPathError(
                f"{where} is a nested tensor (tasks of unequal sizes): batched tasks need "
                "every task's input in one size. Pad the tasks to one size and mask the "
                "padding in the loss, batch tasks of equal size together, or run "
                "innerloop_ctx once per task"
            )


def stack_outputs(outs: list[Any]) -> Any:
    """The tasks' outputs (each a tensor, or a tuple, list or dict of them) stacked task by task
    into one of the same structure; a value that is not a tensor must be the same for every task.
    """
    first, spec = flatten(outs[0])
    columns: list[list[torch.Tensor]] = [[x] for x in first]
    for t, out in enumerate(outs[1:], 1):
        leaves, other = flatten(out)
        if other.structure != spec.structure or other.leaves != spec.leaves:
            raise FastPathError(
                f"task {t}'s output differs in structure from task 0's ({other.structure} vs "
                f"{spec.structure}): batched tasks stack one output per task, so every task's "
                "forward must return the same structure (values that are not tensors equal)"
            )
        for column, x in zip(columns, leaves):
            column.append(x)
    return unflatten(spec, [torch.stack(column) for column in columns])


class _Replay:
    """The random number generators a forward draws from (the CPU's, and the CUDA device's of
    the weights), rewound to where they were made: every task of a loop draws the same."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        self._cpu = torch.get_rng_state()
        cuda = {p.device for p in weights if p.device.type == "cuda"}
        self._cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda]

    def rewind(self) -> None:
        torch.set_rng_state(self._cpu)
        for device, state in self._cuda:
            torch.cuda.set_rng_state(state, device)


def check_batching(batching: object, randomness: str) -> None:
    """Refuse a `batching=` that is not one of `BATCHINGS`, or a loop with vmap's
    `randomness="error"`."""
    if batching not in BATCHINGS:
        raise FastPathError(
            f"batching must be one of {', '.join(map(repr, BATCHINGS))} (how the forward runs "
            f"over the tasks), got {batching!r}"
        )
    if batching == "loop" and randomness == "error":
        raise FastPathError(
            "randomness='error' is vmap's check for random ops, which a loop over tasks cannot "
            "make: use batching='vmap' with it, or randomness='different' or 'same'"
        )


def choose_batching(batching: str, randomness: str, fmodule: FunctionalModule) -> str:
    """A checked `batching=` of a batched model, "auto" resolved to "vmap" or "loop" (logged
    at DEBUG on the `higher` logger)."""
    if batching != "auto":
        return batching
    convs = sorted({type(m).__name__ for m in fmodule.modules() if isinstance(m, _CONVOLUTIONS)})
    on_cpu = any(p.device.type == "cpu" for p in fmodule.fast_params)
    if convs and on_cpu and randomness != "error":
        _LOG.debug(
            "tasks: a loop over tasks (the model has %s layers on a CPU, where vmap's batched "
            "convolutions are slower); batching='vmap' overrides this",
            ", ".join(convs),
        )
        return "loop"
    _LOG.debug("tasks: one forward vmapped over tasks; batching='loop' overrides this")
    return "vmap"


def _present(grads: list[torch.Tensor | None], stepped: list[int]) -> list[torch.Tensor]:
    out = []
    for i in stepped:
        g = grads[i]
        assert g is not None  # a stepped parameter has a gradient
        out.append(g)
    return out


def batched_pair(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    tasks: int,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    override: Mapping[str, Sequence[Any]] | None,
    track_higher_grads: bool,
    randomness: str,
    batching: str = "auto",
) -> tuple[BatchedModule, BatchedOptimizer, DifferentiableOptimizer]:
    """The batched model and optimizer of `innerloop_ctx(model, opt, tasks=tasks)` (checked
    arguments), and the twin the optimizer steps."""
    if randomness not in ("different", "same", "error"):
        raise FastPathError(
            f"randomness must be 'different', 'same' or 'error' (torch.func.vmap's), got "
            f"{randomness!r}"
        )
    check_batching(batching, randomness)  # before the copy: a refused call makes nothing
    fmodule = monkeypatch(
        model,
        device=device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
    )
    chosen = choose_batching(batching, randomness, fmodule)
    fmodel = BatchedModule(fmodule, tasks, randomness, not copy_initial_weights, chosen)
    twin = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    templates = [p.detach() for p in fmodule.fast_params]
    for t, p in zip(templates, fmodule.fast_params):
        t.requires_grad_(p.requires_grad)
    return fmodel, BatchedOptimizer(twin, fmodel, templates), twin


__all__ = ["BatchedModule", "BatchedOptimizer"]
