"""`compile_step`: one inner step (forward, loss, gradient, update) as one compiled function."""

from __future__ import annotations

import dataclasses
import types
import uuid
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any, cast

import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.torch_version import TorchVersion

from higher._engine import Batch, Program, find_unused, pure_step
from higher._errors import UsageError
from higher._strategies import refuse, refuse_hand_written
from higher._torch_warnings import ignore_tracing_warnings, quiet_c_shim_notice
from higher._unroll.routing import routed
from higher.errors import HigherError
from higher.optim import DifferentiableOptimizer, internal
from higher.optim.internal import StepPlan, StepResult
from higher.patch import FunctionalModule
from higher.patch import internal as patch_internal

LossFn = Callable[..., torch.Tensor]

# What `torch.compile` needs to trace `torch.func.grad` into one graph with the update after it.
_MIN_TORCH = "2.3"


class traced_call:  # (named as the function it replaces: `with traced_call(...)`)
    """The environment a compiled call of the functional model runs in: its slots empty, the
    warnings tracing emits filtered, and what torch.compile cannot trace as one graph refused
    as `error(refusal + torch's reason)`. (A class: a generator's context manager costs more
    at every step.)"""

    __slots__ = ("_error", "_fmodel", "_refusal", "_vacated", "_warnings")

    def __init__(self, fmodel: FunctionalModule, error: type[HigherError], refusal: str) -> None:
        self._fmodel, self._error, self._refusal = fmodel, error, refusal

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        try:
            ignore_tracing_warnings()
            # The slots are empty during the call: weights the module holds would alias the
            # inputs, which torch.compile guards by identity, in Python, at every call.
            self._vacated = patch_internal.vacated(self._fmodel)
            self._vacated.__enter__()
        except BaseException:
            self._warnings.__exit__(None, None, None)
            raise

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: Any
    ) -> None:
        try:
            self._vacated.__exit__(None, None, None)  # the slots hold the weights again
        finally:
            self._warnings.__exit__(None, None, None)
        if isinstance(err, torch._dynamo.exc.Unsupported):
            raise self._error(self._refusal.format(reason=str(err).splitlines()[0])) from err


def compiled_own(
    function: Callable[..., Any], owner: object, prefix: str, compile_kwargs: dict[str, Any]
) -> Callable[..., Any]:
    """`torch.compile(fullgraph=True, **compile_kwargs)` of the method `function` bound to
    `owner`, run from a copy of its code under a name of its own (`prefix` and a unique
    suffix). torch.compile keeps its graphs (at most 8) on the code object, and what it learnt
    of input shapes under the code's file, line and name: with a code object per owner, other
    steps (other models or optimizers) neither evict its graphs nor turn its static shapes
    dynamic."""
    plain = cast(types.FunctionType, function)
    name = f"{prefix}_{uuid.uuid4().hex}"
    code = plain.__code__.replace(co_name=name)
    own = types.FunctionType(code, plain.__globals__, name, plain.__defaults__)
    return torch.compile(types.MethodType(own, owner), fullgraph=True, **compile_kwargs)


# The oldest torch whose inductor C++ wrapper is the default on a CPU (the one tested with it).
_CPP_WRAPPER_TORCH = "2.13"


def inductor_defaults(compile_kwargs: dict[str, Any], device: str) -> dict[str, Any]:
    """`compile_kwargs` for a graph whose tensors are on `device` (a device type), with this
    library's inductor options where the caller chose none (no `mode=` or `options=`): no
    tensor size asserts inside the graph (dynamo's guards check the inputs once per call)
    and, on a CPU from torch 2.13, the wrapper around the kernels written in C++
    (`cpp_wrapper`), whose per-call overhead is a fraction of the Python wrapper's; its
    per-graph notice of an op run through its proxy executor is filtered."""
    kwargs = dict(compile_kwargs)
    if kwargs.get("backend", "inductor") != "inductor" or {"mode", "options"} & set(kwargs):
        return kwargs
    options: dict[str, Any] = {"size_asserts": False}
    if device == "cpu" and TorchVersion(torch.__version__) >= _CPP_WRAPPER_TORCH:
        options["cpp_wrapper"] = True
        quiet_c_shim_notice()
    kwargs["options"] = options
    return kwargs


class PerDevice:
    """A method compiled once per device type of the tensors it is given: `compiled_own` of
    `function` bound to its owner, with `inductor_defaults` for that device (so a CUDA model
    keeps inductor's Python wrapper where a CPU one gets the C++ one). What the compiled step
    and the compiled meta-step share."""

    def __init__(self, function: Callable[..., Any], prefix: str, compile_kwargs: dict[str, Any]):
        self._function, self._prefix, self._kwargs = function, prefix, compile_kwargs
        self._made: dict[str, Callable[..., Any]] = {}

    def get(self, owner: object, device: str) -> Callable[..., Any]:
        """The compiled method of `owner` for tensors on `device` (a device type), made at its
        first call (the owner is not kept before then: no reference cycle until compiled)."""
        fn = self._made.get(device)
        if fn is None:
            kwargs = inductor_defaults(self._kwargs, device)
            fn = self._made[device] = compiled_own(self._function, owner, self._prefix, kwargs)
        return fn

    def devices(self) -> list[str]:
        """The device types compiled for so far."""
        return list(self._made)


def check_compile_flag(function: str, compile: object) -> None:
    """Refuse a `compile=` that is not a bool (a string such as "yes" would be truthy)."""
    if not isinstance(compile, bool):
        raise UsageError(
            f"{function}(compile=...) must be True (compile with torch.compile) or False (run "
            f"the same steps eagerly), got {compile!r}; options of torch.compile go as keyword "
            "arguments (backend=..., mode=...)"
        )


@dataclasses.dataclass
class _Context:
    """What the steps of one functional model share. It holds the model and the optimizer only
    weakly: it lives in a cache keyed by the model, which it must not keep alive."""

    diffopt: weakref.ref[DifferentiableOptimizer]
    names: tuple[str, ...]
    #: indices of the parameters that require grad (the candidates for a step)
    requires: list[int]
    #: (qualified name, module, key) of each buffer
    buffers: list[tuple[str, weakref.ref[torch.nn.Module], str]]
    norms: list[tuple[str, weakref.ref[_NormBase]]]
    #: what the set of parameters a loss uses can depend on, besides the batch (a number
    #: standing for it: hashing the whole description at every step would cost more than it)
    architecture: int
    #: the compiled step for the model's device
    compiled: Callable[..., Any]
    #: the last set of unused parameters, the flags of the parameters it steps, and the
    #: nonzero pattern of gradients that agrees with it (`requires`' flags)
    flags: tuple[frozenset[int], list[bool], list[bool]] | None = None
    #: the plan the context was checked with (of every parameter that requires grad), for the
    #: call that made it: its step, where the loss uses them all
    planned: StepPlan | None = None


class CompiledStep:
    """An inner-loop step run as one compiled function: `step(fmodel, diffopt, *batch)` does
    what `diffopt.step(loss_fn(fmodel, *batch))` does, and returns the loss.

    The model's forward, the loss, its gradient and the optimizer's update (`StepPlan.update`
    of the step protocol) are traced once by `torch.compile` (through `torch.func.grad`) into a
    single graph whose backward is the meta-gradient; the functional model's fast weights (and
    their history) and the optimizer's state advance as with `diffopt.step`, to the round-off of
    the compiled kernels (random ops such as dropout draw other numbers than eager torch).
    Made by `higher.compile_step`.

    `loss_fn(model, *batch, **kwargs)` gets `model`: a callable that runs the functional
    model's forward with this step's weights (call it as `model(x)`; it has no attributes).
    Everything else the loss reads (data, targets, tensors it closes over) is an input of the
    graph.

    A parameter the loss does not use gets no update, as with `diffopt.step`. Which ones it
    uses is found by one eager gradient for each model architecture and batch signature (shapes,
    dtypes, keyword values); every compiled step also checks it (a parameter thought unused that
    gets a gradient, or thought used whose gradient is exactly zero, is looked at again, and the
    step is redone if that changes anything).

    Limits, each refused with a clear error: the optimizer is rule-based (every built-in twin
    and every plugin written as a `Rule`); the functional model has fast weights of its own
    (not one from `make_functional`); no BatchNorm or InstanceNorm layer normalizes by batch
    statistics (torch.compile's second-order gradient through them is wrong; with running
    statistics, in eval mode, they run); control flow that depends on tensor values cannot be
    traced as one graph; torch 2.3 or newer. The compiled backward is differentiable once: a
    meta-gradient through the unroll, yes; a gradient of that meta-gradient, no (use
    `diffopt.step` for third-order terms). `compile=False` runs `diffopt.step` itself, the loss
    given as a closure (so it also runs in the memory modes of `innerloop_ctx(..., unroll=...)`).

    Examples:
        >>> import torch, higher
        >>> net = torch.nn.Linear(3, 1)
        >>> step = higher.compile_step(lambda m, x, y: (m(x) - y).pow(2).mean(), backend="eager")
        >>> x, y = torch.ones(4, 3), torch.zeros(4, 1)
        >>> with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1)) as (
        ...     fmodel, diffopt):
        ...     loss = step(fmodel, diffopt, x, y)
        ...     meta = (fmodel(x) - y).pow(2).mean()
        >>> len(list(fmodel.parameters(time=1))), meta.item() < loss.item()
        (2, True)
    """

    def __init__(self, loss_fn: LossFn, *, compile: bool = True, **compile_kwargs: Any) -> None:
        if not callable(loss_fn):
            raise UsageError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_compile_flag("compile_step", compile)
        if compile and TorchVersion(torch.__version__) < _MIN_TORCH:
            raise UsageError(
                f"compile_step needs torch >= {_MIN_TORCH} (torch.compile "
                f"of torch.func.grad); this is torch {torch.__version__}. Use diffopt.step, or "
                "compile_step(..., compile=False), which runs it"
            )
        self._loss_fn = loss_fn
        self._compiled = compile
        # (architecture, batch signature) -> indices of the parameters the loss does not use
        self._unused: dict[Hashable, frozenset[int]] = {}
        # indices the loss uses whose gradient was seen exactly zero (a dead unit, not a change)
        self._zero_ok: dict[Hashable, frozenset[int]] = {}
        # each architecture seen (module names, types and configuration) -> its number
        self._architectures: dict[Hashable, int] = {}
        # the context of the last call (the model held weakly), looked up without a weakref
        self._last: tuple[weakref.ref[FunctionalModule], _Context] | None = None
        self._contexts: weakref.WeakKeyDictionary[FunctionalModule, _Context]
        self._contexts = weakref.WeakKeyDictionary()
        # the compiled step for weights on each device type (made at its first model's call)
        self._per_device = PerDevice(CompiledStep._pure, "_pure", compile_kwargs)

    def __call__(
        self, fmodel: FunctionalModule, diffopt: DifferentiableOptimizer, *batch: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Take one step of `diffopt` on `loss_fn(model, *batch, **kwargs)`; return the loss."""
        if not self._compiled:  # diffopt.step itself, the loss given as a closure (run with
            # grad enabled, as the compiled step computes it, so it also steps under no_grad)
            losses: list[torch.Tensor] = []

            def closure() -> torch.Tensor:
                losses.append(self._loss_fn(fmodel, *batch, **kwargs))
                return losses[-1]

            diffopt.step(closure=closure)
            return losses[0]
        ctx = self._context(fmodel, diffopt)
        planned, ctx.planned = ctx.planned, None  # this call's, or none
        for name, ref in ctx.norms:  # their mode may change between steps
            norm = ref()
            if norm is not None:
                _refuse_batch_statistics(name, norm)
        params = fmodel.fast_params
        key = (ctx.architecture, _signature(batch), _signature(kwargs) if kwargs else None)
        unused = self._unused.get(key)
        if unused is None:
            unused = self._unused[key] = self._find_unused(fmodel, ctx, params, batch, kwargs)
        run, (flags, clean) = self._run, _stepped(ctx, unused, len(params))
        if planned is not None and planned.requires_grad != flags:
            planned = None  # it steps every parameter that requires grad: the loss skips some
        result, loss, moved, nonzero = run(
            fmodel, diffopt, ctx, params, flags, batch, kwargs, planned
        )
        # gradients nonzero exactly where the parameters are used say nothing changed
        if nonzero != clean and self._usage_changed(ctx, key, unused, nonzero):
            found = self._find_unused(fmodel, ctx, params, batch, kwargs)
            self._unused[key] = found
            self._zero_ok[key] = frozenset(
                i for k, i in enumerate(ctx.requires) if i not in found and not nonzero[k]
            )
            if found != unused:  # what the step ran with was wrong: nothing is committed yet
                flags, _ = _stepped(ctx, found, len(params))
                result, loss, moved, _ = run(fmodel, diffopt, ctx, params, flags, batch, kwargs)
        plan, new = result
        for name, module, key_ in ctx.buffers:
            owner = module()
            if owner is not None and name in moved:  # the step's new buffers, not written in
                setattr(owner, key_, moved[name])  # place: an earlier step may have saved them
        # first order without tracking or under no_grad, as step
        committed = internal.commit(diffopt, plan, new)
        internal.remember(diffopt, plan, flags, committed)
        return loss

    def _run(
        self,
        fmodel: FunctionalModule,
        diffopt: DifferentiableOptimizer,
        ctx: _Context,
        params: list[torch.Tensor],
        flags: list[bool],
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
        planned: StepPlan | None = None,
    ) -> tuple[tuple[StepPlan, StepResult], torch.Tensor, dict[str, torch.Tensor], list[bool]]:
        """Plan the step of the parameters `flags` marks and run the compiled function; nothing
        is changed yet. `planned`: a plan of this step made in this call (`_context`'s)."""
        # the last step's plan where the signature is the same (its checks hold), else planned
        plan = (
            internal.repeat_plan(diffopt, params, flags)
            or planned
            or internal.plan(diffopt, params, stepped=flags)
        )
        buffers: dict[str, torch.Tensor] = {}
        for name, module, key in ctx.buffers:
            owner = module()
            buffer = None if owner is None else owner._buffers[key]
            if buffer is not None:
                buffers[name] = buffer
        # what the graph reads of the plan: its buckets (states, options) and rule
        traced = plan._replace(options=[], requires_grad=[])
        refusal = (
            "compile_step could not trace the step as one graph (control flow that depends on "
            "tensor values, or an op torch.compile does not support): {reason}. Use "
            "compile_step(..., compile=False) or diffopt.step for this loss"
        )
        with traced_call(fmodel, UsageError, refusal):
            result, loss, moved, nonzero = ctx.compiled(
                fmodel,
                ctx.names,
                _as_tensors(params),
                ctx.requires,
                buffers,
                traced,
                diffopt.grad_callback,
                batch,
                kwargs,
            )
        # the parameters not stepped are the inputs themselves (not what the graph passed on)
        new = [q if flags[i] else params[i] for i, q in enumerate(result.params)]
        used = nonzero.tolist() if isinstance(nonzero, torch.Tensor) else []
        return (plan, result._replace(params=new)), loss, moved, used

    def _usage_changed(
        self, ctx: _Context, key: Hashable, unused: frozenset[int], nonzero: list[bool]
    ) -> bool:
        """Whether the gradients contradict the parameters thought used: one thought unused
        got a gradient, or one thought used got an exactly-zero one (not seen before)."""
        zero_ok = self._zero_ok.get(key, frozenset())
        for k, i in enumerate(ctx.requires):
            if (i in unused) == nonzero[k] and (i in unused or i not in zero_ok):
                return True
        return False

    def _context(self, fmodel: FunctionalModule, diffopt: DifferentiableOptimizer) -> _Context:
        """The checks and layout of a functional model, worked out once per model."""
        last = self._last
        if last is not None and last[0]() is fmodel and last[1].diffopt() is diffopt:
            return last[1]
        ctx = self._contexts.get(fmodel) if isinstance(fmodel, FunctionalModule) else None
        if ctx is not None and ctx.diffopt() is diffopt:
            self._last = (weakref.ref(fmodel), ctx)
            return ctx
        if not isinstance(fmodel, FunctionalModule):
            raise UsageError(
                "the first argument must be a functional model (from innerloop_ctx or "
                f"higher.patch.monkeypatch), got {type(fmodel).__name__}"
            )
        if not isinstance(diffopt, DifferentiableOptimizer):
            raise UsageError(
                f"the second argument must be a differentiable optimizer, got "
                f"{type(diffopt).__name__}"
            )
        driver = routed(diffopt)
        if driver is not None:  # a memory mode: refused by the table
            refuse(driver.mode, None, "compiled step")
        if diffopt.fmodel is not None and diffopt.fmodel is not fmodel:
            raise UsageError(
                "diffopt was built for another functional model: pass the pair innerloop_ctx "
                "gave (or the fmodel the optimizer was built with)"
            )
        named = fmodel.named_fast_params()  # raises for a module without fast weights
        plan = internal.plan(diffopt, list(named.values()))
        refuse_hand_written(plan, diffopt, "the compiled step", UsageError)
        places, norms, shape = [], [], []
        for prefix, module in fmodel.named_modules():
            if isinstance(module, _NormBase):
                norms.append((prefix, weakref.ref(module)))
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    places.append((f"{prefix}.{key}" if prefix else key, weakref.ref(module), key))
            config = [
                (k, v) for k, v in vars(module).items() if type(v) in _CONFIG_TYPES and k[0] != "_"
            ]
            shape.append((prefix, type(module), tuple(config)))
        first = next(iter(named.values()), None)
        ctx = _Context(
            diffopt=weakref.ref(diffopt),
            names=tuple(named),
            requires=[i for i, p in enumerate(named.values()) if p.requires_grad],
            buffers=places,
            norms=norms,
            architecture=self._architectures.setdefault(
                (tuple(named), tuple(shape)), len(self._architectures)
            ),
            compiled=self._per_device.get(self, "cpu" if first is None else first.device.type),
            planned=plan,
        )
        self._contexts[fmodel] = ctx
        self._last = (weakref.ref(fmodel), ctx)
        return ctx

    def _find_unused(
        self,
        fmodel: FunctionalModule,
        ctx: _Context,
        params: list[torch.Tensor],
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> frozenset[int]:
        """The parameters the loss does not depend on (the engine's `find_unused`)."""
        program = Program(fmodel, ctx.names, self._loss_fn)
        return find_unused(program, params, dict(fmodel.named_buffers()), Batch(batch, kwargs),
                           wrt=ctx.requires, error=UsageError, loss_name="loss_fn")  # fmt: skip

    def _pure(
        self,
        module: torch.nn.Module,
        names: tuple[str, ...],
        params: list[torch.Tensor],
        requires: list[int],
        buffers: dict[str, torch.Tensor],
        plan: StepPlan,
        callback: Callable[[list[torch.Tensor | None]], Any] | None,
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[StepResult, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """The step as a pure function of its inputs (what `torch.compile` traces): the
        engine's pure step, with torch.func's gradient (one graph)."""
        program = Program(module, names, self._loss_fn)
        out = pure_step(params, None, plan, buffers, Batch(batch, kwargs), program=program,
                        wrt=requires, callback=callback)  # fmt: skip
        # whether each gradient is nonzero: the check of which parameters the loss uses
        nonzero = torch.stack([g.ne(0).any() for g in out.grads]) if out.grads else None
        return StepResult(out.params, out.opt_state), out.loss, out.buffers, nonzero


def _as_tensors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """`params` with each `torch.nn.Parameter` seen through a view of itself (a plain tensor;
    the gradient reaches the parameter through it, the values the same). The first step of an
    inner loop whose weights start as the model's parameters (`copy_initial_weights=False`)
    then runs the graph every later step runs: dynamo guards on the inputs' types, and a
    Parameter input would compile a second graph and, at every inner loop's first two steps,
    check the guards of the other one first."""
    if _PARAMETER not in map(type, params):
        return params
    return [p.view_as(p) if type(p) is _PARAMETER else p for p in params]


_PARAMETER = torch.nn.Parameter


def _stepped(ctx: _Context, unused: frozenset[int], n: int) -> tuple[list[bool], list[bool]]:
    """Per parameter, whether a step updates it: it requires grad and the loss uses it; and
    those flags of `ctx.requires` (the nonzero pattern of gradients that agrees). The last
    answer is kept on `ctx`; callers do not modify it."""
    kept = ctx.flags
    if kept is not None and kept[0] is unused and len(kept[1]) == n:
        return kept[1], kept[2]
    flags = [False] * n
    for i in ctx.requires:
        flags[i] = i not in unused
    ctx.flags = (unused, flags, [flags[i] for i in ctx.requires])
    return flags, ctx.flags[2]


# Attribute values that describe a module's configuration (what a forward may branch on).
_CONFIG_TYPES = (bool, int, float, str, type(None))


def _signature(value: Any) -> Hashable:
    """What a loss's set of used parameters can depend on in `value`: tensors by shape, dtype
    and device; numbers, strings and the like by value; containers item by item."""
    if isinstance(value, torch.Tensor):  # (a torch.Size is a tuple)
        return ("tensor", value.shape, value.dtype, value.device, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, Hashable):
        return (type(value), value)
    return (type(value), id(value))


def _refuse_batch_statistics(name: str, sub: _NormBase) -> None:
    """Refuse a normalization layer that normalizes by the batch's own statistics: the
    second-order gradient torch.compile gives through them was wrong (torch 2.13 and 2.14,
    BatchNorm2d: off by a factor, while the forward values matched)."""
    where = f"{type(sub).__name__} ({name or 'the model'})"
    if not sub.track_running_stats:
        raise UsageError(
            f"compile_step does not run {where}: with track_running_stats=False it normalizes "
            "by batch statistics in every mode, and torch.compile's second-order gradient "
            "through them is wrong. Use diffopt.step for this model, or build the layer with "
            "track_running_stats=True and put it in eval mode"
        )
    if sub.training:
        raise UsageError(
            f"compile_step does not run {where} with batch statistics (training mode): "
            "torch.compile's second-order gradient through them is wrong. Use diffopt.step "
            "for this model, or put the normalization layers in eval mode"
        )


def compile_step(loss_fn: LossFn, *, compile: bool = True, **compile_kwargs: Any) -> CompiledStep:
    """An alias of the compiled loop form: `step = compile_step(loss_fn)` then
    `step(fmodel, diffopt, *batch)` is, in `innerloop_ctx(model, opt, compile=True)`,
    `diffopt.step(closure=functools.partial(loss_fn, fmodel, *batch))`: `diffopt.step(
    loss_fn(fmodel, *batch))` traced by `torch.compile` into one graph (forward, loss, gradient
    and update), returning the loss.

    Make it once, outside the task loop, and call it in every inner loop: the graph is
    compiled on the first calls (seconds) and reused by every later task of the same model.
    `compile_kwargs` go to `torch.compile` (`backend=`, `mode=`, `dynamic=`); `compile=False`
    runs `diffopt.step` itself (any torch, any optimizer, any model). With inductor and
    neither `mode=` nor `options=` given, the graph checks no tensor sizes inside (dynamo's
    guards check the inputs at each call) and, on a CPU from torch 2.13, its wrapper around
    the kernels is C++ (`cpp_wrapper`): less time per step than the Python wrapper, a longer
    first compile (the wrapper is built with the C++ compiler).

    Examples:
        >>> import torch, higher
        >>> step = higher.compile_step(lambda m, x: m(x).pow(2).mean(), backend="eager")
        >>> net = torch.nn.Linear(2, 1)
        >>> with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1)) as (
        ...     fmodel, diffopt):
        ...     loss = step(fmodel, diffopt, torch.ones(3, 2))
        >>> type(step).__name__, loss.shape
        ('CompiledStep', torch.Size([]))
    """
    return CompiledStep(loss_fn, compile=compile, **compile_kwargs)


__all__ = ["CompiledStep", "compile_step"]
