"""Forward-mode unrolls: the derivative of the weights and optimizer state with respect to a
few tensors is carried forward, step by step, so nothing of earlier steps is kept.

Each step is taken with its graph, as in a plain unroll; then, for every element `e` of the
tensors `wrt`, the step's Jacobian-vector product (the derivative of its outputs along `e`,
through this step and, by the chain rule, every step before) is read off its graph by reverse
mode twice over: `d/du <vjp(outputs, wrt, u), e>` (a vector-Jacobian product is linear in `u`).
The earlier steps enter through the weights the step started from, which carry their own
derivatives (`_Linearized` nodes), so the step's graph is freed when the step ends. A meta-loss's
backward goes through the last `_Linearized` node to the `wrt` tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from higher._errors import UnrollError
from higher._trees import flatten, unflatten
from higher._unroll.modes import ForwardMode
from higher._unroll.routing import (
    GradCallback,
    hyper_tensors,
    scalar_loss,
    unexpected_leaves,
)
from higher.optim import DifferentiableOptimizer, internal
from higher.optim.internal import StepResult
from higher.patch import FunctionalModule

_NODE = "_LinearizedBackward"


class _Reading:
    """How many steps of one unroll are reading their tangents now (differentiating through its
    `_Linearized` nodes twice, which only they may). Shared by the unroll's nodes; it refers to
    nothing, so it makes no cycle."""

    __slots__ = ("depth",)

    def __init__(self) -> None:
        self.depth = 0

    @contextlib.contextmanager
    def tangents(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


class _Tangents:
    """What a `_Linearized` node holds: the values it outputs (handed over once) and, for each,
    its derivative along every direction (`[directions, *shape]`)."""

    def __init__(self, values: list[torch.Tensor], tangents: list[torch.Tensor],
                 shapes: list[torch.Size], reading: _Reading) -> None:  # fmt: skip
        self.reading = reading
        self.values: list[torch.Tensor] | None = values
        self.tangents = tangents
        self.shapes = shapes


class _Linearized(torch.autograd.Function):
    """Tensors whose derivative with respect to `wrt` is known: backward is `<grad, tangent>`."""

    @staticmethod
    def forward(ctx: Any, info: _Tangents, *wrt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.info = info
        values = info.values
        assert values is not None
        info.values = None
        return tuple(values)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        info: _Tangents = ctx.info
        if torch.is_grad_enabled() and not info.reading.depth:
            raise UnrollError(
                "ForwardMode gives first derivatives of the meta-loss with respect to its wrt "
                "tensors; a gradient of that hypergradient (third order) needs "
                "unroll='recompute' (or 'full')"
            )
        total: torch.Tensor | None = None
        for g, tangent in zip(grads, info.tangents):
            if g is None:
                continue
            part = (tangent * g.unsqueeze(0)).flatten(1).sum(1)
            total = part if total is None else total + part
        if total is None:
            return (None,) * (1 + len(info.shapes))
        out: list[torch.Tensor | None] = [None]
        for piece, shape in zip(total.split([s.numel() for s in info.shapes]), info.shapes):
            out.append(piece.reshape(shape))
        return tuple(out)


class ForwardDriver:
    """Runs the steps of a `ForwardMode` unroll."""

    def __init__(
        self,
        mode: ForwardMode,
        fmodel: FunctionalModule,
        model_params: list[torch.Tensor],
        copy_initial_weights: bool,
    ) -> None:
        self.mode = mode
        self.fmodel = fmodel
        self.reading = _Reading()
        self.wrt: list[torch.Tensor] | None = None if mode.wrt is None else list(mode.wrt)
        self.max_directions = mode.max_directions
        self.model_params = {id(p) for p in model_params}
        listed = set() if self.wrt is None else {id(t) for t in self.wrt}
        if not copy_initial_weights:
            missing = [p for p in model_params if p.requires_grad and id(p) not in listed]
            if missing:
                raise UnrollError(
                    "copy_initial_weights=False asks for the meta-gradient with respect to the "
                    "model's weights, which ForwardMode does not give (it carries one "
                    "derivative per element of its wrt tensors, and a model has many): use "
                    "unroll='recompute', or copy_initial_weights=True"
                )
        # the first fast weights of copy_initial_weights=True: leaves nobody asks gradients of
        self.own = [] if not copy_initial_weights else list(fmodel.fast_params)
        if self.wrt is not None:
            self._check_size(self.wrt)

    def _check_size(self, wrt: list[torch.Tensor]) -> None:
        n = sum(t.numel() for t in wrt)
        if n > self.max_directions:
            raise UnrollError(
                f"ForwardMode would carry {n} derivatives (one per element of its wrt tensors), "
                f"more than max_directions={self.max_directions}: each costs about two backward "
                "passes per step. Use unroll='recompute' for many hyperparameters, or raise "
                "max_directions"
            )

    def step(
        self,
        diffopt: DifferentiableOptimizer,
        loss: torch.Tensor | None,
        override: Mapping[str, Sequence[Any]] | None,
        grad_callback: GradCallback | None,
        closure: Callable[[], torch.Tensor] | None,
        kwargs: dict[str, Any],
    ) -> list[torch.Tensor]:
        if closure is not None:
            if loss is not None:
                raise UnrollError("give step either the loss or a closure, not both")
            with torch.enable_grad():
                loss = closure()
        elif loss is None:
            raise UnrollError("step needs the loss: step(loss) or step(closure=lambda: ...)")
        params = self.fmodel.fast_params
        with torch.enable_grad():
            plan, grads, result = internal.compute_step(
                diffopt, scalar_loss(loss), params, create_graph=True,
                grad_callback=grad_callback, override=override, update_kwargs=kwargs,
            )  # fmt: skip
        wrt = self._directions(hyper_tensors(plan))
        stepped = [i for i, g in enumerate(grads) if g is not None]
        leaves, spec = flatten(result.states)
        outs = [result.params[i] for i in stepped] + leaves
        self._check_reach(outs, wrt)
        carried = [k for k, o in enumerate(outs) if o.requires_grad and o.is_floating_point()]
        tangents = self._tangents([outs[k] for k in carried], wrt)
        values = [o.detach() for o in outs]
        if carried:
            info = _Tangents(
                [values[k] for k in carried], tangents, [t.shape for t in wrt], self.reading
            )
            linearized = _Linearized.apply(info, *wrt)  # type: ignore[no-untyped-call]
            for k, v in zip(carried, linearized):
                values[k] = v
        new_params = list(params)
        for k, i in enumerate(stepped):
            new_params[i] = values[k]
        states = unflatten(spec, values[len(stepped) :])
        return internal.commit(diffopt, plan, StepResult(new_params, states))

    def _directions(self, hyper: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors to differentiate with respect to (checked once they are known)."""
        if self.wrt is None:
            if not hyper:
                raise UnrollError(
                    "ForwardMode has nothing to differentiate with respect to: override "
                    "hyperparameters with tensors that require grad (override={'lr': [lr]}), "
                    "or name the tensors: higher.ForwardMode(wrt=[...])"
                )
            self._check_size(hyper)
            self.wrt = hyper
        listed = {id(t) for t in self.wrt}
        stray = [t for t in hyper if id(t) not in listed]
        if stray:
            raise UnrollError(
                f"this step's hyperparameters include a tensor that requires grad (shape "
                f"{tuple(stray[0].shape)}) that is not among ForwardMode's wrt tensors: its "
                "hypergradient would be lost. Add it to wrt=[...]"
            )
        return self.wrt

    def _check_reach(self, outs: list[torch.Tensor], wrt: list[torch.Tensor]) -> None:
        stray = unexpected_leaves(outs, [*wrt, *self.own], lambda node: node.name() == _NODE)
        if stray:
            what = (
                "the model's initial weights"
                if id(stray[0]) in self.model_params
                else f"a tensor of shape {tuple(stray[0].shape)} (data the loss uses?)"
            )
            raise UnrollError(
                f"this step depends on {what}, which requires grad but is not among "
                "ForwardMode's wrt tensors: its gradient would be lost. Add it to wrt=[...] "
                "if it has few elements, or use unroll='recompute'"
            )

    def _tangents(self, outs: list[torch.Tensor], wrt: list[torch.Tensor]) -> list[torch.Tensor]:
        """d outs / d wrt along every element of `wrt`: one `[directions, *shape]` per output."""
        n = sum(t.numel() for t in wrt)
        found = [torch.zeros((n, *o.shape), dtype=o.dtype, device=o.device) for o in outs]
        if not outs:
            return found
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        with self.reading.tangents(), torch.enable_grad():
            vjps = torch.autograd.grad(outs, wrt, us, create_graph=True, allow_unused=True)
            d = 0
            for v, w in zip(vjps, wrt):
                if v is None or not v.requires_grad:
                    d += w.numel()
                    continue
                flat = v.reshape(-1)
                for e in range(w.numel()):
                    columns = torch.autograd.grad(flat[e], us, retain_graph=True,
                                                  allow_unused=True)  # fmt: skip
                    for column, into in zip(columns, found):
                        if column is not None:
                            into[d] = column.detach()
                    d += 1
        return found

    def close(self, diffopt: DifferentiableOptimizer) -> None:
        """Nothing to let go of: no step keeps a closure."""
