"""`compile_step`: one inner step (forward, loss, gradient, update) as one compiled function."""

from __future__ import annotations

import dataclasses
import itertools
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn.modules.batchnorm import _NormBase

from higher.optim import DifferentiableOptimizer, RuleOptimizer
from higher.patch import FunctionalModule

from ._errors import UsageError

LossFn = Callable[..., torch.Tensor]

# What `torch.compile` needs to trace `torch.func.grad` into one graph with the update after it.
_MIN_TORCH = (2, 3)
_STEP_IDS = itertools.count()
_NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"
_TORCH_DEPRECATED = r"`torch\.[\w.]+` is deprecated"


def torch_version() -> tuple[int, int]:
    """(major, minor) of the torch in use."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@dataclasses.dataclass
class _Context:
    """What the steps of one functional model and optimizer pair share."""

    diffopt: RuleOptimizer
    names: tuple[str, ...]
    #: indices of the parameters that are stepped (trainable and used by the loss)
    trainable: list[int]
    position: dict[int, int]
    #: per param group, per slot: whether the slot is stepped
    live: list[list[bool]]
    #: (qualified name, module, key) of each buffer
    buffers: list[tuple[str, torch.nn.Module, str]]
    norms: list[tuple[str, _NormBase]]
    #: one None per fast weight: what the slots hold during the compiled call
    blank: list[None]


class CompiledStep:
    """An inner-loop step run as one compiled function: `step(fmodel, diffopt, *batch)` does
    what `diffopt.step(loss_fn(fmodel, *batch))` does, and returns the loss.

    The model's forward, the loss, its gradient and the optimizer's update are traced once by
    `torch.compile` (through `torch.func.grad`) into a single graph whose backward is the
    meta-gradient; the functional model's fast weights (and their history) and the optimizer's
    state advance as with `diffopt.step`, to the round-off of the compiled kernels (random
    ops such as dropout draw other numbers than eager torch). Made by `higher.compile_step`.

    `loss_fn(model, *batch, **kwargs)` gets `model`: a callable that runs the functional
    model's forward with this step's weights (call it as `model(x)`; it has no attributes).
    Everything else the loss reads (data, targets, tensors it closes over) is an input of the
    graph.

    Limits, each refused with a clear error: the optimizer is a rule-based twin (every
    built-in one; `RuleOptimizer`); the functional model has fast weights of its own (not one
    from `make_functional`); no BatchNorm or InstanceNorm layer normalizes by batch statistics
    (torch.compile's second-order gradient through them is wrong; in eval mode they run);
    torch 2.3 or newer. The compiled backward is differentiable once:
    a meta-gradient through the unroll, yes; a gradient of that meta-gradient, no (use
    `diffopt.step` for third-order terms).

    Example:
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
        if compile and torch_version() < _MIN_TORCH:
            raise UsageError(
                f"compile_step needs torch >= {'.'.join(map(str, _MIN_TORCH))} (torch.compile "
                f"of torch.func.grad); this is torch {torch.__version__}. Use diffopt.step, or "
                "compile_step(..., compile=False) for the same step uncompiled"
            )
        self._loss_fn = loss_fn
        # A frozen or unused parameter gets no update (as in diffopt.step); which ones are
        # unused is found once per architecture, by one eager gradient.
        self._unused: dict[tuple[str, ...], frozenset[int]] = {}
        self._contexts: weakref.WeakKeyDictionary[FunctionalModule, _Context]
        self._contexts = weakref.WeakKeyDictionary()
        self._fn: Callable[..., Any] = self._pure
        if compile:
            # torch.compile keeps its graphs (at most 8) on the code object, and what it learnt
            # of input shapes under the code's file, line and name: each step gets a copy of
            # `_pure`'s code under a name of its own, so steps for other models or optimizers
            # neither evict its graphs nor turn its static shapes dynamic.
            pure = CompiledStep._pure
            name = f"_pure_{next(_STEP_IDS)}"
            code = pure.__code__.replace(co_name=name)
            own = types.FunctionType(code, pure.__globals__, name, pure.__defaults__)
            self._fn = torch.compile(types.MethodType(own, self), fullgraph=True, **compile_kwargs)

    def __call__(
        self, fmodel: FunctionalModule, diffopt: DifferentiableOptimizer, *batch: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Take one step of `diffopt` on `loss_fn(model, *batch, **kwargs)`; return the loss."""
        ctx = self._contexts.get(fmodel) if isinstance(fmodel, FunctionalModule) else None
        if ctx is None or ctx.diffopt is not diffopt:
            ctx = self._contexts[fmodel] = self._context(fmodel, diffopt, batch, kwargs)
        opt = ctx.diffopt  # diffopt itself, checked to be a RuleOptimizer
        for name, norm in ctx.norms:  # their mode may change between steps
            _refuse_batch_statistics(name, norm)
        store = fmodel._higher_store
        params = store.at(None)
        buffers: dict[str, torch.Tensor] = {}
        for name, module, key in ctx.buffers:
            buffer = module._buffers[key]
            if buffer is not None:
                buffers[name] = buffer
        mappings = opt._group_to_param_list
        opt._load_params(params)
        buckets = opt._buckets(ctx.live)
        plan = []  # per bucket: (positions among the trainable, state, options)
        for g, slots in buckets:
            state, hyper = opt._gather(g, slots)
            mapping = mappings[g]
            plan.append(([ctx.position[mapping[j]] for j in slots], state, hyper))
        with warnings.catch_warnings():
            # torch.compile reads `.grad` of every input tensor while it traces; the weights of
            # an unroll are not leaves, and torch warns of that read (an error under -W error).
            warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
            # and the compiler imports modules of torch's that warn of their own deprecation
            warnings.filterwarnings(
                "ignore", message=_TORCH_DEPRECATED, category=DeprecationWarning
            )
            # The slots are emptied for the call: weights the module holds would alias the
            # inputs, which torch.compile guards by identity, in Python, at every call.
            store.place(ctx.blank)
            try:
                new_params, new_states, loss, moved = self._fn(
                    fmodel,
                    ctx.names,
                    params,
                    ctx.trainable,
                    buffers,
                    opt.rule,
                    plan,
                    opt._grad_callback,
                    batch,
                    kwargs,
                )
            except BaseException:
                store.place(params)
                raise
        if moved:
            with torch.no_grad():
                for name, buffer in buffers.items():
                    buffer.copy_(moved[name])
        for (g, slots), out, new_state in zip(buckets, new_params, new_states, strict=True):
            opt._scatter(g, slots, out, new_state)
        # first order, or no graph at all: the weights stay trainable for the next step
        first_order = not (opt.track_higher_grads and torch.is_grad_enabled())
        updated = opt._collect_params(params, first_order)
        store.set(updated)  # shapes, dtypes and devices are the rule's: as checked at first
        return loss  # type: ignore[no-any-return]

    def _context(
        self,
        fmodel: FunctionalModule,
        diffopt: DifferentiableOptimizer,
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _Context:
        """Check the pair once and work out what every later step of it reuses."""
        if not isinstance(fmodel, FunctionalModule):
            raise UsageError(
                "the first argument must be a functional model (from innerloop_ctx or "
                f"higher.patch.monkeypatch), got {type(fmodel).__name__}"
            )
        if not isinstance(diffopt, RuleOptimizer):
            raise UsageError(
                "compile_step runs rule-based differentiable optimizers (every built-in twin); "
                f"{type(diffopt).__name__} is not one: use diffopt.step for it"
            )
        if diffopt._fmodel is not None and diffopt._fmodel is not fmodel:
            raise UsageError(
                "diffopt was built for another functional model: pass the pair innerloop_ctx "
                "gave (or the fmodel the optimizer was built with)"
            )
        named = fmodel.named_fast_params()  # raises for a module without fast weights
        names = tuple(named)
        params = list(named.values())
        diffopt._check_step_params(params)
        unused = self._unused.get(names)
        if unused is None:
            unused = self._unused[names] = self._find_unused(fmodel, names, params, batch, kwargs)
        trainable = [i for i, p in enumerate(params) if p.requires_grad and i not in unused]
        position = {i: k for k, i in enumerate(trainable)}
        places, norms = [], []
        for prefix, module in fmodel.named_modules():
            if isinstance(module, _NormBase):
                norms.append((prefix, module))
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    places.append((f"{prefix}.{key}" if prefix else key, module, key))
        return _Context(
            diffopt=diffopt,
            names=names,
            trainable=trainable,
            position=position,
            live=[[i in position for i in mapping] for mapping in diffopt._group_to_param_list],
            buffers=places,
            norms=norms,
            blank=[None] * len(names),
        )

    def _find_unused(
        self,
        fmodel: FunctionalModule,
        names: tuple[str, ...],
        params: list[torch.Tensor],
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> frozenset[int]:
        """The parameters the loss does not depend on (one eager forward and gradient, with
        the buffers restored afterwards, so running statistics move only once per step)."""
        saved = {k: b.detach().clone() for k, b in fmodel.named_buffers()}
        probe = [p.detach().requires_grad_(p.requires_grad) for p in params]

        def model(*args: Any, **kw: Any) -> Any:
            return torch.func.functional_call(fmodel, dict(zip(names, probe)), args, kw)

        try:
            loss = self._loss_fn(model, *batch, **kwargs)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
                raise UsageError(f"loss_fn must return a scalar tensor, got {shape}")
            wanted = [i for i, p in enumerate(probe) if p.requires_grad]
            if not wanted:
                return frozenset()
            if not loss.requires_grad:
                raise UsageError(
                    "the loss does not depend on the model's parameters: loss_fn must compute "
                    "it from what model(...) returns"
                )
            grads = torch.autograd.grad(loss, [probe[i] for i in wanted], allow_unused=True)
        finally:
            with torch.no_grad():
                for k, b in fmodel.named_buffers():
                    b.copy_(saved[k])
        return frozenset(i for i, g in zip(wanted, grads, strict=True) if g is None)

    def _pure(
        self,
        module: torch.nn.Module,
        names: tuple[str, ...],
        params: list[torch.Tensor],
        trainable: list[int],
        buffers: dict[str, torch.Tensor],
        rule: Any,
        plan: Sequence[tuple[list[int], Any, dict[str, Any]]],
        callback: Callable[[list[torch.Tensor | None]], Any] | None,
        batch: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[list[list[torch.Tensor]], list[Any], torch.Tensor, dict[str, torch.Tensor]]:
        """The step as a pure function of its inputs (what `torch.compile` traces)."""

        # A module may update its buffers in place (running averages); torch.func.grad refuses
        # in-place updates of tensors captured from outside the function it transforms. The
        # forward updates copies made inside it, which are copied into the buffers afterwards.
        def loss_of(
            live: list[torch.Tensor],
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
            current = list(params)
            for k, i in enumerate(trainable):
                current[i] = live[k]
            moved = {k: b.clone() for k, b in buffers.items()}
            tensors = {**moved, **dict(zip(names, current))}

            def model(*args: Any, **kw: Any) -> Any:
                return torch.func.functional_call(module, tensors, args, kw)

            loss = self._loss_fn(model, *batch, **kwargs)
            return loss, (loss, moved)

        live = [params[i] for i in trainable]
        grads, (loss, moved) = torch.func.grad(loss_of, has_aux=True)(live)
        if callback is not None:
            full: list[torch.Tensor | None] = [None] * len(params)
            for k, i in enumerate(trainable):
                full[i] = grads[k]
            full = list(callback(full))
            grads = [full[i] for i in trainable]
        new_params, new_states = [], []
        for slots, state, hyper in plan:
            out, new_state = rule.update(
                [live[k] for k in slots], [grads[k] for k in slots], state, hyper
            )
            new_params.append(out)
            new_states.append(new_state)
        return new_params, new_states, loss, moved


def _refuse_batch_statistics(name: str, sub: _NormBase) -> None:
    """Refuse a normalization layer that normalizes by the batch's own statistics: the
    second-order gradient torch.compile gives through them was wrong (torch 2.13 and 2.14,
    BatchNorm2d: off by a factor, while the forward values matched)."""
    if sub.training or not sub.track_running_stats:
        raise UsageError(
            f"compile_step does not run {type(sub).__name__} ({name or 'the model'}) with "
            "batch statistics (training mode): torch.compile's second-order gradient "
            "through them is wrong. Use diffopt.step for this model, or put the "
            "normalization layers in eval mode"
        )


def compile_step(loss_fn: LossFn, *, compile: bool = True, **compile_kwargs: Any) -> CompiledStep:
    """Make a `CompiledStep`: `step(fmodel, diffopt, *batch)` is `diffopt.step(loss_fn(fmodel,
    *batch))` traced by `torch.compile` into one graph (forward, loss, gradient and update).

    Make it once, outside the task loop, and call it in every inner loop: the graph is
    compiled on the first calls (seconds) and reused by every later task of the same model.
    `compile_kwargs` go to `torch.compile` (`backend=`, `mode=`, `dynamic=`); `compile=False`
    runs the same step through `torch.func` without compiling.

    Example:
        >>> import torch, higher
        >>> step = higher.compile_step(lambda m, x: m(x).pow(2).mean(), backend="eager")
        >>> isinstance(step, higher.CompiledStep)
        True
    """
    return CompiledStep(loss_fn, compile=compile, **compile_kwargs)


__all__ = ["CompiledStep", "compile_step"]
