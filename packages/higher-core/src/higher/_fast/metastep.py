"""`compile_meta_step`: a whole meta-step (k inner steps and the outer loss) as one compiled graph.

The inner loop is a `scan` (torch's higher-order loop operator) over one step body: forward,
inner loss, its gradient (`torch.func.grad`) and the optimizer's pure update
(`StepPlan.run` of the step protocol). torch.compile traces the body once, whatever `k` is, so
the compile time does not grow with the number of steps; the compiled backward of the graph is
the meta-gradient. With `tasks=T` the loop runs for every task at once under `torch.func.vmap`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.torch_version import TorchVersion

from higher._context import check_model_and_opt, innerloop_ctx
from higher._engine import (
    Batch,
    Program,
    autograd_gradient,
    bind,
    find_unused,
    follow_modes,
    func_gradient,
    pure_step,
)
from higher._errors import FastPathError, UsageError
from higher._fast.compiled import (
    PerDevice,
    _signature,
    check_compile_flag,
    traced_call,
)
from higher._fast.tasks import per_task_update, refuse_nested
from higher._strategies import RunName, refuse, refuse_hand_written
from higher._trees import flatten, map_leaves, unflatten
from higher._unroll.modes import Full, Mode, resolve
from higher.optim import get_diff_optim, internal
from higher.optim.internal import StepPlan, StepResult
from higher.patch import FunctionalModule, monkeypatch

LossFn = Callable[..., torch.Tensor]
#: what the loop carries from step to step: the stepped weights, the optimizer's state (one
#: per bucket) and the model's buffers
Carry = tuple[list[torch.Tensor], list[Any], dict[str, torch.Tensor]]

# The oldest torch the compiled meta-step is verified on: scan with autograd under
# torch.compile, vmap of scan, and torch.func.grad inside the scanned body.
_MIN_TORCH = "2.13"


class MetaStep:
    """A meta-step as one compiled function: `meta(model, opt, *batch)` unrolls `steps` steps
    of `opt`'s differentiable twin on `inner_loss_fn(fmodel, *batch)`, starting from `model`'s
    parameters, and returns `outer_loss_fn(fmodel, *batch)` at the adapted weights; its
    backward is the meta-gradient (into `model.parameters()` and the tensors of `override`
    that require grad). Made by `higher.meta_step` (or its alias `higher.compile_meta_step`).

    It computes what this loop computes (in float64, to round-off):

        with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                  override=override) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(inner_loss_fn(fmodel, *batch))
            meta_loss = outer_loss_fn(fmodel, *batch)

    In a memory mode (`unroll=` other than "full", eagerly) the loop above runs with it, each
    step `diffopt.step(closure=...)`.

    With `tasks=T`, every positional tensor of `batch` carries the task dimension first, the
    loop runs once per task (vmapped) and the result is the `T` outer losses (reduce them, e.g.
    `.mean()`, before `backward()`). Keyword arguments are shared by every task.

    The loss functions get `fmodel`: a callable that runs the model's forward with the current
    weights (call it as `fmodel(x)`; it has no attributes). The model and the optimizer are not
    changed: buffers (running statistics) are carried from step to step on copies (each step
    updates its own, so the outer loss reads the statistics after the steps), one per task,
    and dropped at the end. Compiled, a model whose buffers move (a module with buffers in
    training mode) has its steps traced one after another instead of as a loop (torch's loop
    operator cannot carry them): its compile time grows with `steps`. BatchNorm in training
    mode is exact (tested in float64, with tasks): each
    task's gradient is taken as the gradient of the vmapped losses' sum, never as a vmapped
    gradient (whose second-order term through batch statistics torch gets wrong).

    Refused with `FastPathError`: torch older than 2.13 (use `compile=False`, which runs the
    same steps as a Python loop on any torch); optimizers with a hand-written `_update`; tasks
    of unequal sizes (nested tensors); compiled, a rule that reads its step count as a number
    (`float(step)`; the count is a tensor inside the loop; `compile=False` runs it) and what
    else torch.compile cannot trace as one graph (control flow on tensor values). Random ops
    (dropout) raise torch's vmap randomness error with tasks. Tested with tasks: every built-in
    twin with `compile=False`, and compiled SGD, Adam, NAdam, RAdam, Adafactor; learnable
    learning rates.
    The compiled backward is differentiable once (no gradient of the meta-gradient). On a CPU,
    with inductor's default options (no `mode=` or `options=` given), inductor writes the
    loop's wrapper in C++ (`cpp_wrapper`), which takes less time per inner step than its
    Python wrapper.

    Examples:
        >>> import torch, higher
        >>> net = torch.nn.Linear(2, 1)
        >>> mse = lambda m, x, y: (m(x) - y).pow(2).mean()
        >>> meta = higher.compile_meta_step(mse, mse, steps=3, compile=False)
        >>> loss = meta(net, torch.optim.SGD(net.parameters(), lr=0.1),
        ...             torch.ones(4, 2), torch.zeros(4, 1))
        >>> loss.backward()
        >>> net.weight.grad.shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        inner_loss_fn: LossFn,
        outer_loss_fn: LossFn,
        *,
        steps: int,
        unroll: str | Mode = "full",
        tasks: int | None = None,
        compile: bool = True,
        **compile_kwargs: Any,
    ) -> None:
        if not callable(inner_loss_fn) or not callable(outer_loss_fn):
            raise UsageError("inner_loss_fn and outer_loss_fn must be callable")
        mode = resolve(unroll)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise FastPathError(f"steps must be a positive int, got {steps!r}")
        if tasks is not None and (
            isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1
        ):
            raise FastPathError(f"tasks must be None or a positive int, got {tasks!r}")
        check_compile_flag("compile_meta_step", compile)
        refuse(mode, tasks, "compiled meta_step" if compile else "eager meta_step")
        if compile and TorchVersion(torch.__version__) < _MIN_TORCH:
            raise FastPathError(
                f"compile_meta_step needs torch >= {_MIN_TORCH} (scan with "
                f"autograd under torch.compile); this is torch {torch.__version__}. Use "
                "compile_meta_step(..., compile=False), which runs the same steps as a loop"
            )
        self._mode = mode
        self._inner = inner_loss_fn
        self._outer = outer_loss_fn
        self._steps = steps
        self._tasks = tasks
        self._compiled = compile
        self._models: weakref.WeakKeyDictionary[torch.nn.Module, FunctionalModule]
        self._models = weakref.WeakKeyDictionary()
        self._unused: dict[Hashable, frozenset[int]] = {}
        self._peel: dict[Hashable, bool] = {}
        # the compiled meta-step for tensors on each device type, a code object of its own
        # (other meta-steps neither evict its graphs nor make its shapes dynamic)
        self._per_device = PerDevice(MetaStep._pure, "_meta_step", compile_kwargs)

    @property
    def steps(self) -> int:
        """The number of inner steps."""
        return self._steps

    @property
    def tasks(self) -> int | None:
        """The number of tasks batched (None: one task, unbatched)."""
        return self._tasks

    def __call__(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        *batch: Any,
        override: dict[str, list[Any]] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The outer loss after `steps` inner steps from `model`'s parameters (with `tasks`,
        one per task)."""
        check_model_and_opt(model, opt)
        ddp = None
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # as innerloop_ctx: the model it wraps runs, the meta-gradients average across ranks
            run: RunName = "compiled meta_step" if self._compiled else "eager meta_step"
            refuse(self._mode, self._tasks, run, "DDP")
            ddp, model = model, model.get_submodule("module")
        if not isinstance(self._mode, Full):
            return self._looped(model if ddp is None else ddp, opt, batch, override, kwargs)
        fmodule = self._functional(model)
        params: list[torch.Tensor] = list(model.parameters())
        refuse_nested(batch, kwargs)
        if self._tasks is not None:
            for k, arg in enumerate(batch):
                if isinstance(arg, torch.Tensor) and (
                    arg.dim() == 0 or arg.shape[0] != self._tasks
                ):
                    raise FastPathError(
                        f"positional argument {k} has shape {tuple(arg.shape)}; with tasks="
                        f"{self._tasks} each takes the task dimension first: shape "
                        f"({self._tasks}, ...) (pass shared tensors as keyword arguments)"
                    )
        names = tuple(fmodule.named_fast_params())
        buffers = dict(model.named_buffers())
        twin = get_diff_optim(opt, params, override=override)
        if ddp is not None:
            from higher.distributed._ddp import arm_inner_loop

            arm_inner_loop(ddp, twin, copy_initial_weights=False, loops=self._tasks or 1)
        key = (names, tuple(p.requires_grad for p in params), _signature(batch), _signature(kwargs))
        unused = self._unused.get(key)
        if unused is None:
            unused = self._unused[key] = self._find_unused(
                fmodule, names, params, buffers, batch, kwargs
            )
        stepped = [p.requires_grad and i not in unused for i, p in enumerate(params)]
        plan = internal.plan(twin, params, stepped=stepped)
        refuse_hand_written(plan, twin, "meta_step", FastPathError)
        traced = plan._replace(options=[], requires_grad=[])
        if not self._compiled:
            return self._pure(fmodule, names, params, buffers, traced, "loop", batch, kwargs)  # type: ignore[no-any-return]
        compiled = self._per_device.get(self, params[0].device.type if params else "cpu")
        start = None
        # Running statistics that move (a module with buffers in training mode) are carried
        # from step to step out of place; torch's scan cannot carry them (its backward treats
        # every carry as differentiable, and batch_norm refuses statistics that require
        # grad), so these steps are traced one after another (compile time grows with steps).
        mode = "loop" if _moving_buffers(fmodule) else "scan"
        if mode == "scan" and (self._probe(plan, params) or self._tasks is not None):
            # eagerly, before the graph: inductor's meta-gradient through a scan that starts
            # from a step traced in the same graph was wrong, and with tasks through a scan
            # that starts from the expanded initial weights and state (Adam; torch 2.13,
            # aot_eager right in both)
            start = self._pure(fmodule, names, params, buffers, traced, "first", batch, kwargs)
        refusal = (
            f"compile_meta_step could not trace the meta-step ({plan.name}) as one graph "
            "(control flow that depends on tensor values, random ops, or an op torch.compile "
            "does not support): {reason}. Use compile_meta_step(..., compile=False) or "
            "innerloop_ctx"
        )
        try:
            with traced_call(fmodule, FastPathError, refusal):
                return compiled(  # type: ignore[no-any-return]
                    fmodule, names, params, buffers, traced, mode, batch, kwargs, start
                )
        except torch._dynamo.exc.TorchDynamoException as err:  # what is not Unsupported
            raise FastPathError(refusal.format(reason=str(err).splitlines()[0])) from err

    def _looped(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        batch: tuple[Any, ...],
        override: dict[str, list[Any]] | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The meta-step in a memory mode: the loop form's steps, the loss as a closure."""
        with innerloop_ctx(model, opt, copy_initial_weights=False, override=override,
                           unroll=self._mode) as (fmodel, diffopt):  # fmt: skip
            step = functools.partial(self._inner, fmodel, *batch, **kwargs)
            for _ in range(self._steps):
                diffopt.step(closure=step)
            return self._outer(fmodel, *batch, **kwargs)

    def _probe(self, plan: StepPlan, params: list[torch.Tensor]) -> bool:
        """Check that the rule runs with its step count a tensor, and say whether the first
        step must run before the loop. Found once per rule and form of the initial state, by
        steps of the rule on detached copies.

        Inside the loop the count is a tensor (the body is traced once): a rule that reads it
        as a Python number (`float(step)`, `if step > ...`) is refused here, found by a step
        under vmap where the count cannot be read. The first step runs apart when it changes
        the state's form (SGD's momentum buffer starts as None), which a loop's carry cannot.
        """
        states = [b.state for b in plan.buckets]
        before = [_form(s) for s in _tensor_counts(states)]
        key = (plan.name, repr(before))
        known = self._peel.get(key)
        if known is not None:
            return known
        device = params[0].device if params else None

        def with_count(count: torch.Tensor) -> torch.Tensor:
            _probe_step(plan, params, _tensor_counts(states, device, count))
            return count

        try:
            torch.func.vmap(with_count)(torch.zeros(1, dtype=torch.float64, device=device))
        except RuntimeError as err:  # other errors: the compiled trace says whether it runs
            if "data-dependent" in str(err) or ".item()" in str(err):
                raise FastPathError(
                    f"compile_meta_step(compile=True) cannot run {plan.name}: its update reads "
                    "the step count as a Python number (a branch or float() on it), and inside "
                    "the compiled loop the count is a tensor. Use compile_meta_step(..., "
                    "compile=False) or batched_innerloop_ctx, which run it exactly"
                ) from err
        after = _probe_step(plan, params).states
        known = self._peel[key] = before != [_form(s) for s in _tensor_counts(after)]
        return known

    def _functional(self, model: torch.nn.Module) -> FunctionalModule:
        """The functional copy whose forward the graph runs (made once per model); its modes
        follow the model's."""
        fmodule = self._models.get(model)
        if fmodule is None:
            fmodule = self._models[model] = monkeypatch(model)
        follow_modes(fmodule, model)
        return fmodule

    def _find_unused(
        self,
        fmodule: FunctionalModule,
        names: tuple[str, ...],
        params: list[torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> frozenset[int]:
        """The parameters the inner loss does not use (the engine's `find_unused`, on the first
        task): they are not stepped, as with `diffopt.step`."""
        first = batch
        if self._tasks is not None:
            first = tuple(a[0] if isinstance(a, torch.Tensor) else a for a in batch)
        wrt = [i for i, p in enumerate(params) if p.requires_grad]
        return find_unused(Program(fmodule, names, self._inner), params, buffers,
                           Batch(first, kwargs), wrt=wrt, error=FastPathError,
                           loss_name="inner_loss_fn")  # fmt: skip

    def _pure(
        self,
        module: torch.nn.Module,
        names: tuple[str, ...],
        params: list[torch.Tensor],
        buffers: dict[str, torch.Tensor],
        plan: StepPlan,
        mode: str,
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
        start: Carry | None = None,
    ) -> Any:
        """The meta-step as a pure function of its inputs (what torch.compile traces): the
        engine's pure step, looped or scanned, with the weights, the optimizer's state and the
        buffers (running statistics, updated out of place) carried from step to step.

        `mode` "loop": the steps as a Python loop; "scan": in a scan, from `start` (the
        weights, state and buffers after the first step) when given; "first": only the first
        step, returning the weights, state and buffers after it."""
        inner_fn, outer_fn, steps = self._inner, self._outer, self._steps
        stepped = sorted(i for bucket in plan.buckets for i in bucket.indices)
        # the step before the graph runs eagerly: plain autograd, which (unlike torch.func)
        # also runs under saved-tensor hooks (activation offloading, memory probes)
        gradient = autograd_gradient if mode == "first" else func_gradient
        tasks = self._tasks
        assert plan.rule is not None  # checked by __call__
        # one value for all tasks: the step count and the rule's scalar state
        shared = frozenset(("step", *plan.rule.scalar_state))
        dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in batch)

        def full(live: list[torch.Tensor]) -> list[torch.Tensor]:
            current = list(params)
            for k, i in enumerate(stepped):
                current[i] = live[k]
            return current

        def task_loss(
            fn: LossFn, live: list[torch.Tensor], bufs: dict[str, torch.Tensor], *data: Any
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            model, new = bind(module, names, full(live), bufs)
            return fn(model, *data, **kwargs), new

        def all_losses(
            fn: LossFn, live: list[torch.Tensor], bufs: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            """Every task's loss (live stacked per task), one vmapped forward, and every
            task's new buffers (one per task, as each task's own copy of the model holds)."""
            run = torch.func.vmap(
                functools.partial(task_loss, fn), in_dims=(0, 0, *dims), randomness="error"
            )
            out: tuple[torch.Tensor, dict[str, torch.Tensor]] = run(live, bufs, *batch)
            return out

        def step(carry: Carry, batched: bool = True) -> Carry:
            live, states, bufs = carry
            if tasks is None:
                done = pure_step(
                    full(live), states, plan, bufs, Batch(batch, kwargs),
                    program=Program(module, names, inner_fn), wrt=stepped, gradient=gradient,
                )  # fmt: skip
                return [done.params[i] for i in stepped], done.opt_state, done.buffers
            # The gradient of the sum of the tasks' losses w.r.t. the stacked weights is each
            # task's gradient (task t's loss reads slice t only): grad of vmap, exact to any
            # order with batch statistics too (vmap of grad is not). The rule runs per task.
            if not batched:
                live = [p.expand(tasks, *p.shape) for p in live]
                bufs = {k: b.expand(tasks, *b.shape) for k, b in bufs.items()}

            def summed(
                live: list[torch.Tensor],
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                losses, new = all_losses(inner_fn, live, bufs)
                return losses.sum(), new

            grads, new_bufs = gradient(summed, live)
            # The step count and the rule's scalar state (NAdam's mu_product, ASGD's eta and
            # mu) are one value for all tasks, unbatched

            def task_update(
                live: list[torch.Tensor], grads: list[torch.Tensor], task_states: list[Any]
            ) -> tuple[list[torch.Tensor], list[Any]]:
                full_g: list[torch.Tensor | None] = [None] * len(params)
                for k, i in enumerate(stepped):
                    full_g[i] = grads[k]
                result = plan.run(full(live), full_g, task_states)
                return [result.params[i] for i in stepped], result.states

            new_live, new_states = per_task_update(
                task_update, live, list(grads), states, shared, 0 if batched else None
            )
            return new_live, new_states, new_bufs

        carry: Carry = ([params[i] for i in stepped], [b.state for b in plan.buckets], buffers)
        device = params[0].device if params else None
        if mode == "first":
            return step(carry, batched=False)
        if mode == "loop":  # step counts stay Python numbers, as in diffopt.step
            for k in range(steps):
                carry = step(carry, batched=k > 0)
        elif start is not None:
            live, states, bufs = start
            carry = (live, _tensor_counts(states, device), bufs)
            if steps > 1:
                carry = _loop(step, carry, steps - 1)
        else:  # with tasks, the first step always runs apart (see __call__)
            assert tasks is None
            carry = _loop(step, (carry[0], _tensor_counts(carry[1], device), buffers), steps)
        live, _, bufs = carry
        if tasks is None:
            model, _ = bind(module, names, full(live), bufs)
            return outer_fn(model, *batch, **kwargs)
        return all_losses(outer_fn, live, bufs)[0]


def _moving_buffers(module: torch.nn.Module) -> bool:
    """Whether a forward may update buffers: a submodule with buffers is in training mode."""
    return any(
        m.training and any(b is not None for b in m._buffers.values()) for m in module.modules()
    )


def _form(state: Any) -> Any:
    """What a loop's carry must keep of a state: its structure, shapes and dtypes."""
    leaves, spec = flatten(state)
    return repr(spec), [(tuple(t.shape), t.dtype) for t in leaves]


def _tensor_counts(
    states: list[Any], device: torch.device | None = None, count: torch.Tensor | None = None
) -> list[Any]:
    """The states with every step count (a Python number) made a float64 tensor (on `device`;
    `count` plus the number when given): inside the loop the body is traced once, so a count
    must be a value of the carry."""

    def tensor(x: Any) -> Any:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            number = torch.tensor(float(x), dtype=torch.float64, device=device)
            return number if count is None else count + number
        return x

    return [map_leaves(tensor, s) for s in states]


def _probe_step(plan: StepPlan, params: list[torch.Tensor], states: Any = None) -> StepResult:
    """One step of the plan's rule on detached copies of `params`, every gradient one."""
    with torch.no_grad():
        copies = [p.detach() for p in params]
        grads: list[torch.Tensor | None] = [None] * len(params)
        for bucket in plan.buckets:
            for i in bucket.indices:
                grads[i] = torch.ones_like(copies[i])
        return plan.run(copies, grads, states)


def _loop(step: Callable[[Carry], Carry], carry: Carry, n: int) -> Carry:
    """`n` more steps in one `scan`, for a model whose buffers do not move (they are the same
    for every step: constants of the loop). The carry is one flat buffer per dtype and device
    (the weights and the state's tensors concatenated): a few loop variables instead of dozens
    (each costs the compiled loop checks and copies per iteration), and no size-one
    dimension, whose strides torch's scan backward compares literally (a (40, 1) weight
    failed there, as its gradient's strides differed)."""
    from torch._higher_order_ops.scan import scan

    live, states, bufs = carry
    state_leaves, spec = flatten(states)
    tensors = [*live, *state_leaves]
    shapes = [t.shape for t in tensors]
    sizes = [t.numel() for t in tensors]
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    members = list(groups.values())
    n_live = len(live)

    def pack(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([ts[i].reshape(-1) for i in idx]) for idx in members]

    def unpack(packed: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[Any]]:
        out: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
        for flat, idx in zip(packed, members):
            parts = torch.split(flat, [sizes[i] for i in idx])
            for i, part in zip(idx, parts):
                out[i] = part.view(shapes[i])
        return out[:n_live], unflatten(spec, out[n_live:])

    def body(
        packed: list[torch.Tensor], _: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        new_live, new_states, _bufs = step((*unpack(packed), bufs))
        leaves, _spec = flatten(new_states)
        return pack([*new_live, *leaves]), torch.zeros((), device=packed[0].device)

    xs = torch.zeros(n, device=tensors[0].device)
    final, _ = scan(body, pack(tensors), xs)
    return (*unpack(final), bufs)


def meta_step(
    inner_loss_fn: LossFn,
    outer_loss_fn: LossFn,
    *,
    steps: int,
    unroll: str | Mode = "full",
    tasks: int | None = None,
    compile: bool = False,
    **compile_kwargs: Any,
) -> MetaStep:
    """The function form of an inner loop: `meta = meta_step(inner, outer, steps=k)`, then
    `meta(model, opt, *batch, override=...)` is the outer loss after `k` steps of `opt`'s twin
    on `inner(fmodel, *batch)` from `model`'s parameters; its backward is the meta-gradient
    (into `model.parameters()` and the tensors of `override` that require grad).

    The strategies are arguments, as in `innerloop_ctx`: `unroll=` (the memory mode; in a
    memory mode each step runs `diffopt.step(closure=...)` of the loop form), `tasks=T` (every
    positional tensor of the batch carries the task dimension first; the result is the `T`
    outer losses), `compile=True` (the whole meta-step one `torch.compile`d graph, the inner
    loop a scan traced once; `compile_kwargs` go to `torch.compile`) or False (the same steps
    eagerly, any torch). A combination that does not compose is refused with
    `higher.CompositionError` (docs/composition.md). A `DistributedDataParallel` model runs
    the model it wraps and averages the meta-gradients across its ranks, as `innerloop_ctx`.
    `MetaStep` documents the rest.

    Examples:
        >>> import torch, higher
        >>> net = torch.nn.Linear(1, 1)
        >>> mse = lambda m, x, y: torch.nn.functional.mse_loss(m(x), y)
        >>> meta = higher.meta_step(mse, mse, steps=5, unroll="recompute")
        >>> x, y = torch.randn(10, 1), torch.randn(10, 1)
        >>> meta(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y).backward()
        >>> net.weight.grad.shape
        torch.Size([1, 1])
    """
    return MetaStep(inner_loss_fn, outer_loss_fn, steps=steps, unroll=unroll, tasks=tasks,
                    compile=compile, **compile_kwargs)  # fmt: skip


def compile_meta_step(
    inner_loss_fn: LossFn,
    outer_loss_fn: LossFn,
    *,
    steps: int,
    tasks: int | None = None,
    compile: bool = True,
    **compile_kwargs: Any,
) -> MetaStep:
    """An alias: `meta_step(inner_loss_fn, outer_loss_fn, steps=steps, tasks=tasks,
    compile=compile)`, compiled by default. `meta(model, opt, *batch)` is the outer loss after
    `steps` inner steps of `opt`'s twin from `model`'s parameters, the whole meta-step one
    compiled graph whose backward is the meta-gradient.

    Make it once and call it every meta-iteration: the graph is compiled on the first call (the
    loop body once, whatever `steps` is; torch caches compiled artefacts on disk, so a second
    process compiles faster) and reused while the model, the optimizer's options and the batch
    shapes stay the same. `compile_kwargs` go to `torch.compile`; `compile=False` runs the same
    steps as a Python loop (any torch).

    Examples:
        >>> import torch, higher
        >>> net = torch.nn.Linear(1, 1)
        >>> mse = lambda m, x, y: torch.nn.functional.mse_loss(m(x), y)
        >>> meta = higher.compile_meta_step(mse, mse, steps=5, tasks=4, compile=False)
        >>> x, y = torch.randn(4, 10, 1), torch.randn(4, 10, 1)   # 4 tasks of 10 points
        >>> meta(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y).shape
        torch.Size([4])
    """
    return meta_step(inner_loss_fn, outer_loss_fn, steps=steps, tasks=tasks, compile=compile,
                     **compile_kwargs)  # fmt: skip


__all__ = ["MetaStep", "compile_meta_step", "meta_step"]
