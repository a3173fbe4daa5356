"""`innerloop_ctx`: a functional model and a differentiable optimizer for one inner loop, with
its strategies as arguments: the memory mode (`unroll=`), batched tasks (`tasks=`) and a
compiled step (`compile=`); `_strategies.TABLE` says which combinations run."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, overload

import torch

from higher._errors import FastPathError, UnrollError, UsageError
from higher._fast.compiled import CompiledStep, check_compile_flag
from higher._fast.tasks import BatchedModule, BatchedOptimizer, batched_pair
from higher._strategies import refuse
from higher._unroll.modes import ForwardMode, Full, Mode, resolve
from higher._unroll.routing import Driver, GradCallback, attach, check_routable
from higher.optim import DifferentiableOptimizer, get_diff_optim, twin_of
from higher.patch import FunctionalModule, monkeypatch


@overload
def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Sequence[Any]] | None = None,
    track_higher_grads: bool = True,
    unroll: str | Mode = "full",
    *,
    tasks: None = None,
    compile: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    randomness: str = "different",
    batching: str = "auto",
) -> contextlib.AbstractContextManager[tuple[FunctionalModule, DifferentiableOptimizer]]: ...


@overload
def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Sequence[Any]] | None = None,
    track_higher_grads: bool = True,
    unroll: str | Mode = "full",
    *,
    tasks: int,
    compile: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    randomness: str = "different",
    batching: str = "auto",
) -> contextlib.AbstractContextManager[tuple[BatchedModule, BatchedOptimizer]]: ...


def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Sequence[Any]] | None = None,
    track_higher_grads: bool = True,
    unroll: str | Mode = "full",
    *,
    tasks: int | None = None,
    compile: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    randomness: str = "different",
    batching: str = "auto",
) -> contextlib.AbstractContextManager[tuple[Any, Any]]:
    """Yield `(fmodel, diffopt)`: a functional copy of `model` and the twin of `opt`.

    `diffopt.step(loss)` takes a step of `opt`'s rule out of place and makes the new weights
    `fmodel`'s current ones, so a loss after `k` steps is differentiable with respect to the
    initial weights (with `copy_initial_weights=False`, `model.parameters()` themselves), the
    hyperparameters given as tensors in `override`, and the data. Neither `model` nor `opt` is
    changed. `diffopt.step(closure=lambda: loss_fn(fmodel(x), y))` computes the loss itself.

    How the loop runs is chosen by `unroll=`, `tasks=` and `compile=`; they compose where the
    result is exact, and a combination that does not is refused with `higher.CompositionError`
    (the table: docs/composition.md).

    Args:
        model: the module to unroll.
        opt: a torch optimizer over `model.parameters()` (its hyperparameters and state are
            copied; a stepped optimizer's moments carry over).
        device: where fast weights, buffers and optimizer state live (default: where they are).
        copy_initial_weights: False makes the first fast weights `model.parameters()`, so a
            meta-loss's `backward()` fills their `.grad` (MAML); True detaches them.
        override: hyperparameter -> values (one, or one per param group); tensors that require
            grad make that hyperparameter learnable.
        track_higher_grads: False makes each step first order: no graph through the updates.
            With `copy_initial_weights=False` the gradient of a loss on the adapted weights
            still reaches `model.parameters()` (first-order MAML).
        unroll: how the unroll pays for its meta-gradient (docs/memory-modes.md): "full"
            (every step's graph is kept: the default), "recompute" or `higher.Recompute(every=c)`
            (exact, each step rebuilt during the backward pass: a fraction of the memory),
            `higher.Truncated(window=W)` (the last W steps only), "forward" or
            `higher.ForwardMode(wrt=[...])` (exact for a few hyperparameters, memory flat in the
            number of steps). Recompute and truncated take the loss as a closure:
            `diffopt.step(closure=lambda: loss_fn(fmodel(x), y))`. In these modes the fast
            weights of earlier steps are not kept (`fmodel.keep_history` is False).
        tasks: `T` runs `T` inner loops at once under `torch.func.vmap`: `fmodel` is a
            `higher.BatchedModule` (inputs with the task dimension first) and `diffopt` a
            `higher.BatchedOptimizer` (`step` takes one loss per task, shape `(T,)`); what
            `higher.batched_innerloop_ctx` documents. None (the default): one inner loop.
        compile: True runs each step as one `torch.compile`d function (forward, loss, gradient
            and update; what `higher.compile_step` documents). The step must then compute its
            loss, from a loss function and a batch: `diffopt.step(closure=functools.partial(
            loss_fn, fmodel, x, y))` runs `loss_fn(model, x, y)` in the compiled graph (`model`
            is a callable running the functional model's forward). A loss tensor, or a closure
            that hides its function and inputs (a lambda), is refused with `UsageError`.
        compile_options: keyword arguments of `torch.compile` (`backend=`, `mode=`), with
            `compile=True`.
        randomness: with `tasks`, `torch.func.vmap`'s randomness ("different": each task
            draws its own dropout masks; "same"; "error").
        batching: with `tasks`, how the forward runs over the tasks: "vmap" (one vmapped
            forward), "loop" (one forward per task on its slices of the stacked weights, the
            outputs stacked) or "auto" (the default: the loop for a model with convolution
            layers on a CPU, where vmap's batched convolutions are slower, vmap otherwise;
            `fmodel.batching` says which, and the `higher` logger at DEBUG).

    A `torch.nn.parallel.DistributedDataParallel` model is patched through its `module`, and
    the meta-gradients that reach its parameters (and learnable hyperparameters) are averaged
    across its ranks at the end of each backward pass outside `ddp.no_sync()`, weighted by the
    number of inner loops each rank ran (`tasks=T` counts `T`): see `higher.distributed`.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         _ = diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        ...     torch.nn.functional.mse_loss(fmodel(x), y).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """
    return _innerloop(
        model,
        opt,
        device,
        copy_initial_weights,
        override,
        track_higher_grads,
        unroll,
        tasks=tasks,
        compile=compile,
        compile_options=compile_options,
        randomness=randomness,
        batching=batching,
    )


@contextlib.contextmanager
def _innerloop(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    override: Mapping[str, Sequence[Any]] | None,
    track_higher_grads: bool,
    unroll: str | Mode,
    *,
    tasks: int | None,
    compile: bool,
    compile_options: Mapping[str, Any] | None,
    randomness: str,
    batching: str,
) -> Iterator[tuple[Any, Any]]:
    """`innerloop_ctx`'s context."""
    check_model_and_opt(model, opt)
    mode = resolve(unroll)
    check_tasks(tasks)
    check_compile_flag("innerloop_ctx", compile)
    if compile_options is not None and not isinstance(compile_options, Mapping):
        raise UsageError(
            "compile_options must be a mapping of torch.compile's keyword arguments (e.g. "
            f"{{'backend': 'eager'}}), got {type(compile_options).__name__}"
        )
    if compile_options and not compile:
        raise UsageError("compile_options are torch.compile's: give them with compile=True")
    if tasks is None and batching != "auto":
        raise UsageError(
            f"batching={batching!r} says how tasks run: give it with tasks=T (one inner loop "
            "has no tasks to batch)"
        )
    ddp = None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # The wrapper holds process-group handles (not copyable): patch the model it wraps.
        ddp, model = model, model.get_submodule("module")
    refuse(mode, tasks, "compiled step" if compile else "eager loop",
           "one process" if ddp is None else "DDP")  # fmt: skip
    if tasks is not None:
        bmodel, batched, twin = batched_pair(model, opt, tasks, device, copy_initial_weights,
                                             override, track_higher_grads, randomness,
                                             batching)  # fmt: skip
        _arm(ddp, twin, copy_initial_weights, tasks)
        yield bmodel, batched
        return
    if not isinstance(mode, Full):
        with _unrolled(model, opt, device, copy_initial_weights, override, track_higher_grads,
                       mode, ddp) as pair:  # fmt: skip
            yield pair
        return
    if compile:
        with _compiled(model, opt, device, copy_initial_weights, override, track_higher_grads,
                       dict(compile_options or {}), ddp) as pair:  # fmt: skip
            yield pair
        return
    fmodel = monkeypatch(
        model,
        device=device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    _arm(ddp, diffopt, copy_initial_weights)
    yield fmodel, diffopt


def batched_innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    tasks: int,
    *,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Sequence[Any]] | None = None,
    track_higher_grads: bool = True,
    randomness: str = "different",
    batching: str = "auto",
) -> contextlib.AbstractContextManager[tuple[BatchedModule, BatchedOptimizer]]:
    """An alias: `innerloop_ctx(model, opt, tasks=tasks, ...)`, `tasks` inner loops at once.

    The loop is the one `innerloop_ctx` runs, over a stacked batch of tasks run with
    `torch.func.vmap`: inputs carry the task dimension first, `fmodel(x)` runs every task's
    forward, and `diffopt.step(losses)` takes one loss per task (shape `(tasks,)`) and steps
    each task with its own gradient and optimizer state. Every task starts from `model`'s
    weights (with `copy_initial_weights=False`, `model.parameters()` themselves, so a
    meta-loss's backward sums every task's meta-gradient into their `.grad`); the results equal
    `tasks` separate `innerloop_ctx` loops (float64 tests: SGD with momentum, Adam, learnable
    learning rates, BatchNorm in training mode).

    Refused, with `FastPathError`: optimizers with a hand-written `_update` (rule-based twins
    only); a loss that is not one value per task, or one that couples the tasks where that is
    seen (on the first step: nonzero losses, every gradient exactly zero, and task 0's loss
    reaching another task's weights, as with `l - l.mean()`); inputs that are nested tensors
    (tasks of unequal sizes: pad and mask, or group tasks of equal size). `randomness` is
    `torch.func.vmap`'s ("different": each task draws its own dropout masks; "same"; "error").
    `batching` says how the forward runs over the tasks: "vmap", "loop" (a forward per task on
    its slices of the stacked weights) or "auto" (the loop for a model with convolution layers
    on a CPU, where it is faster, vmap otherwise); both compute the same values.

    Examples:
        >>> net = torch.nn.Linear(1, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 5, 1), torch.randn(8, 5, 1)   # 8 tasks of 5 points
        >>> mse = torch.vmap(torch.nn.functional.mse_loss)
        >>> with higher.batched_innerloop_ctx(net, opt, tasks=8, copy_initial_weights=False) as (
        ...     fmodel, diffopt):
        ...     for _ in range(3):
        ...         _ = diffopt.step(mse(fmodel(x), y))
        ...     mse(fmodel(x), y).mean().backward()
        >>> net.weight.grad.shape
        torch.Size([1, 1])
    """
    check_tasks(tasks, required=True)  # the alias always batches (None: one inner loop)
    return innerloop_ctx(
        model,
        opt,
        device=device,
        copy_initial_weights=copy_initial_weights,
        override=override,
        track_higher_grads=track_higher_grads,
        tasks=tasks,
        randomness=randomness,
        batching=batching,
    )


def check_tasks(tasks: object, required: bool = False) -> None:
    """Refuse a `tasks=` that is not None or a positive int."""
    if tasks is None and not required:
        return
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise FastPathError(
            f"tasks must be a positive int (the number of tasks batched), got {tasks!r}"
        )


def _arm(
    ddp: torch.nn.parallel.DistributedDataParallel | None,
    diffopt: DifferentiableOptimizer,
    copy_initial_weights: bool,
    loops: int = 1,
) -> None:
    """Average this loop's meta-gradients across the ranks of a DDP model."""
    if ddp is not None:  # torch.distributed is touched only for a DDP model
        from higher.distributed._ddp import arm_inner_loop

        arm_inner_loop(ddp, diffopt, copy_initial_weights, loops)


# The compiled step of each loss function (and torch.compile options), shared by the inner
# loops that use it: each inner loop of a meta-training run reuses the graphs of the first.
_STEPS: weakref.WeakKeyDictionary[Callable[..., torch.Tensor], dict[str, CompiledStep]]
_STEPS = weakref.WeakKeyDictionary()


class _CompiledDriver:
    """The steps of `innerloop_ctx(..., compile=True)`: each `diffopt.step(closure=partial(
    loss_fn, fmodel, *batch))` runs the `CompiledStep` of `loss_fn`."""

    def __init__(self, fmodel: FunctionalModule, options: dict[str, Any]) -> None:
        self.mode = Full()
        self.fmodel = fmodel
        self.options = options
        self.local: dict[str, CompiledStep] = {}

    def step(
        self,
        diffopt: DifferentiableOptimizer,
        loss: torch.Tensor | None,
        override: Mapping[str, Sequence[Any]] | None,
        grad_callback: GradCallback | None,
        closure: Callable[[], torch.Tensor] | None,
        kwargs: dict[str, Any],
    ) -> list[torch.Tensor]:
        partial = closure if isinstance(closure, functools.partial) else None
        if (
            loss is not None
            or partial is None
            or not partial.args
            or (partial.args[0] is not self.fmodel)
        ):
            got = "a loss tensor" if loss is not None else f"closure={closure!r}"
            raise UsageError(
                "innerloop_ctx(..., compile=True) compiles the step with its loss, so step takes "
                "the loss function and its batch: diffopt.step(closure=functools.partial("
                f"loss_fn, fmodel, x, y)), which runs loss_fn(fmodel, x, y); got {got}. Use "
                "compile=False to step on a loss tensor or any closure"
            )
        extra = [n for n, v in (("override", override), ("grad_callback", grad_callback)) if v]
        if extra or kwargs:
            raise UsageError(
                f"a compiled step takes no per-step {', '.join(extra + list(kwargs))}: give "
                "override= and grad_callback= to innerloop_ctx/the optimizer, or use "
                "compile=False"
            )
        fn = partial.func
        try:
            steps = _STEPS.setdefault(fn, {})
        except TypeError:  # a function that takes no weak reference: kept for this loop
            steps = self.local
        key = repr(sorted(self.options.items()))
        compiled = steps.get(key)
        if compiled is None:
            compiled = steps[key] = CompiledStep(fn, **self.options)
        compiled(self.fmodel, diffopt, *partial.args[1:], **partial.keywords)
        params: list[torch.Tensor] = self.fmodel.fast_params
        return params

    def close(self, diffopt: DifferentiableOptimizer) -> None:
        pass  # the compiled steps stay for the next inner loop


@contextlib.contextmanager
def _compiled(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    override: Mapping[str, Sequence[Any]] | None,
    track_higher_grads: bool,
    options: dict[str, Any],
    ddp: torch.nn.parallel.DistributedDataParallel | None,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """`innerloop_ctx` with compiled steps: the optimizer's `step` runs a `CompiledStep`."""
    twin = twin_of(type(opt))
    check_routable(twin, "compiled steps", "compile=True")
    fmodel = monkeypatch(model, device=device, copy_initial_weights=copy_initial_weights,
                         track_higher_grads=track_higher_grads)  # fmt: skip
    diffopt = twin(opt, model.parameters(), fmodel=fmodel, device=device, override=override,
                     track_higher_grads=track_higher_grads)  # fmt: skip
    driver = _CompiledDriver(fmodel, options)
    attach(diffopt, driver)
    _arm(ddp, diffopt, copy_initial_weights)
    try:
        yield fmodel, diffopt
    finally:
        attach(diffopt, None)
        driver.close(diffopt)


@contextlib.contextmanager
def _unrolled(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    override: Mapping[str, Sequence[Any]] | None,
    track_higher_grads: bool,
    mode: Mode,
    ddp: torch.nn.parallel.DistributedDataParallel | None,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """`innerloop_ctx` in a memory mode: the optimizer's `step` is the mode's."""
    from higher._unroll.forward import ForwardDriver
    from higher._unroll.recompute import RecomputeDriver

    if not track_higher_grads:
        raise UnrollError(
            f"unroll={mode!r} saves the memory of a second-order unroll; with "
            "track_higher_grads=False no step keeps a graph, so there is nothing to save: "
            "drop unroll="
        )
    twin = twin_of(type(opt))
    check_routable(twin, f"unroll={mode!r}", "unroll=")
    fmodel = monkeypatch(
        model, device=device, copy_initial_weights=copy_initial_weights, track_higher_grads=True
    )
    fmodel.keep_history = False
    diffopt = twin(opt, model.parameters(), fmodel=fmodel, device=device, override=override)
    driver: Driver
    if isinstance(mode, ForwardMode):
        driver = ForwardDriver(mode, fmodel, list(model.parameters()), copy_initial_weights)
    else:
        assert not isinstance(mode, Full)
        driver = RecomputeDriver(mode, fmodel, diffopt)
    attach(diffopt, driver)
    _arm(ddp, diffopt, copy_initial_weights)
    try:
        yield fmodel, diffopt
    finally:
        attach(diffopt, None)
        driver.close(diffopt)


def check_model_and_opt(model: object, opt: object) -> None:
    """Refuse a model that is no module, or an optimizer that is no torch optimizer."""
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(opt, torch.optim.Optimizer):
        raise UsageError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
