"""Recompute and truncated unrolls: each step is one node of the autograd graph that keeps
only what rebuilds the step, and rebuilds it (its forward, gradient and update, with their
graph) when the backward pass reaches it.

A step's node takes as inputs the tensors the step depends on that require grad: the fast
weights, the optimizer state, the hyperparameters and what the loss closure takes from
outside (the data, a learned loss's weights); its outputs are the new weights and state. The
backward of the node is the step's vector-Jacobian product, computed on the rebuilt graph, so
gradients reach every place they reach in a plain unroll, to any order.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from higher._errors import UnrollError
from higher._trees import flatten, unflatten
from higher._unroll.modes import Recompute, Truncated
from higher._unroll.routing import (
    Captures,
    Environment,
    GradCallback,
    StepEnv,
    hyper_tensors,
    require_closure,
    scalar_loss,
    stripped,
    unexpected_leaves,
)
from higher.optim import DifferentiableOptimizer, internal
from higher.optim.internal import StepPlan, StepResult
from higher.patch import FunctionalModule
from higher.patch import internal as patch_internal

Tensors = list[torch.Tensor]


class _Products:
    """How many steps of one unroll are computing their own vector-Jacobian product now: while
    one is, the other steps' nodes its graph reaches (through tensors the closure took from
    earlier steps) are paths the backward pass itself follows, so they contribute nothing there.
    Shared by the unroll's records and cut nodes; it refers to nothing, so it makes no cycle."""

    __slots__ = ("depth",)

    def __init__(self) -> None:
        self.depth = 0


class _Segment:
    """What steps rebuilt from one kept state share: the inputs of its steps, filled when the
    backward pass first needs one (the first step keeps its inputs; the others are run again
    from it, forward only). Steps point to the previous one and to this; nothing points back,
    so a finished unroll is freed by reference counting alone."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, bool], tuple[Tensors, Tensors]] = {}


class _Record:
    """One step: what rebuilds it, and how its gradient maps to the node's inputs."""

    def __init__(
        self,
        unroll: RecomputeDriver,
        closure: Callable[[], torch.Tensor],
        callback: GradCallback | None,
        plan: StepPlan,
        env: StepEnv,
        loss: torch.Tensor,
        stepped: list[int],
        p_flags: list[bool],
        s_flags: list[bool],
        state_spec: Any,
        index: int,
        watched: _Watched | None,
    ) -> None:
        self.unroll = unroll
        self.index = index
        self.closure: Callable[[], torch.Tensor] | None = closure
        self.callback = callback
        #: the step's gradients and what its callback returned, the first time (check=True)
        self.fingerprints = None if watched is None else watched.fingerprints()
        self.plan = plan
        self.env: StepEnv | None = env
        self.loss = loss
        self.stepped = stepped
        self.p_flags = p_flags
        self.s_flags = s_flags
        self.state_spec = state_spec
        self.alive = True
        #: inputs kept (weights, state leaves): the first step of a segment
        self.saved: tuple[Tensors, Tensors] | None = None
        #: where each input comes from otherwise: ("p"|"s", position among the previous
        #: step's outputs) or ("k", a tensor kept)
        self.p_links: list[tuple[str, Any]] = []
        self.s_links: list[tuple[str, Any]] = []
        #: per node input: its roles, ("p", i) a weight, ("s", j) a state leaf, ("x", t) a
        #: hyperparameter or a tensor the closure takes from outside
        self.roles: list[list[tuple[str, Any]]] = []
        self.segment = _Segment()
        self.previous: _Record | None = None  # in the segment
        self.outputs: Tensors | None = None  # handed to the node once

    # -- running the step -----------------------------------------------------------------

    def run(self, params: Tensors, states: Tensors, graph: bool) -> tuple[Tensors, Tensors]:
        """The step again from `params` and state leaves `states`: the new weights (all of
        them) and state leaves; with `graph`, with their graph (second order), else values."""
        unroll = self.unroll
        assert self.closure is not None and self.env is not None
        with unroll.env.restored(self.env), torch.enable_grad():
            if not graph:
                params = [p.detach().requires_grad_(f) for p, f in zip(params, self.p_flags)]
            with patch_internal.using(unroll.fmodel, params):
                loss = scalar_loss(self.closure())
            self._check(loss)
            watched = None if self.fingerprints is None else _Watched(self.callback)
            grads = unroll.diffopt.gradients(
                loss,
                params,
                create_graph=graph,
                grad_callback=self.callback if watched is None else watched,
            )
            if watched is not None:
                self._check_gradients(watched)
            if [i for i, g in enumerate(grads) if g is not None] != self.stepped:
                raise UnrollError(
                    f"step {self.index} uses other weights when rebuilt than when it was "
                    "taken: the closure must compute the same loss every time it is called"
                )
            state = unflatten(self.state_spec, states if graph else [s.detach() for s in states])
            with torch.set_grad_enabled(graph):
                result = self.plan.update(params, grads, state)
        leaves, _ = flatten(result.states)
        if not graph:
            return [p.detach() for p in result.params], [s.detach() for s in leaves]
        return list(result.params), leaves

    def _check(self, loss: torch.Tensor) -> None:
        if not self.unroll.check:
            return
        old, new = self.loss, loss.detach()
        tol = _tolerance(old.dtype)
        # equal_nan: a loss that is NaN (or made of infinities) is the same NaN when run again
        if not torch.allclose(new, old, rtol=tol, atol=tol * 1e-3, equal_nan=True):
            raise UnrollError(
                f"step {self.index}'s closure gave another loss when it was run again "
                f"({new.item():.10g} instead of {old.item():.10g}): it must compute the same "
                "thing every time. A lambda that reads a loop variable sees its latest value: "
                "bind it (lambda x=x, y=y: loss_fn(fmodel(x), y)). Kernels that are not "
                "deterministic: Recompute(check=False) accepts their round-off"
            )

    def _check_gradients(self, watched: _Watched) -> None:
        """The step's gradients, and what its grad_callback made of them, are those of the
        first time (or raise, naming the step)."""
        assert self.fingerprints is not None
        given, returned = self.fingerprints
        again_given, again_returned = watched.fingerprints()
        tol = _tolerance(self.loss.dtype)
        if not _same(again_given, given, tol):
            raise UnrollError(
                f"step {self.index}'s gradients differ when the step is rebuilt (before any "
                "grad_callback runs): the closure must compute the same thing every time. "
                "Kernels that are not deterministic: Recompute(check=False) accepts their "
                "round-off"
            )
        if not _same(again_returned, returned, tol):
            raise UnrollError(
                f"step {self.index}'s grad_callback returned other gradients when the step was "
                "rebuilt, from the same gradients: recompute and truncated unrolls call it "
                "again during the backward pass, so it must be pure (a function of its input "
                "only: no step counter, no Python random numbers). A schedule: give each step "
                "its own callback (grad_callback=clip_grad_norm(schedule[t])); random numbers: "
                "draw them with torch (each rebuilt step draws them again from the same "
                "state); or use unroll='full'"
            )

    def inputs(self, graph: bool) -> tuple[Tensors, Tensors]:
        """This step's input weights and state leaves: kept, or run again from the segment's
        first step (every step between filled into the segment's cache on the way)."""
        if self.saved is not None:
            return list(self.saved[0]), list(self.saved[1])
        cache = self.segment.cache
        key = (self.index, graph)
        if key not in cache:
            chain: list[_Record] = [self]
            while chain[-1].previous is not None:
                chain.append(chain[-1].previous)
            chain.reverse()
            params, states = chain[0].inputs(graph)
            for record, following in itertools.pairwise(chain):
                params, states = following.link(*record.run(params, states, graph))
                cache[(following.index, graph)] = (params, states)
        return cache.pop(key)

    def link(self, params: Tensors, states: Tensors) -> tuple[Tensors, Tensors]:
        """This step's inputs from the previous step's outputs."""

        def get(link: tuple[str, Any]) -> torch.Tensor:
            kind, where = link
            found: torch.Tensor = (
                params[where] if kind == "p" else states[where] if kind == "s" else where
            )
            return found

        return [get(x) for x in self.p_links], [get(x) for x in self.s_links]

    # -- the node's backward ----------------------------------------------------------------

    def backward(
        self, grads: Sequence[torch.Tensor | None], needs: Sequence[bool]
    ) -> list[torch.Tensor | None]:
        n = len(needs)
        if not self.alive:  # outside a truncated unroll's window: a constant
            return [None] * n
        if self.closure is None:
            raise UnrollError(
                "this step was released (its unroll ended without keeping it); take the "
                "meta-gradient before the next meta-iteration"
            )
        graph = torch.is_grad_enabled()  # a gradient of this gradient is wanted
        products = self.unroll.products
        products.depth += 1
        try:
            return self._vjp(grads, needs, graph)
        finally:
            products.depth -= 1

    def _vjp(
        self, grads: Sequence[torch.Tensor | None], needs: Sequence[bool], graph: bool
    ) -> list[torch.Tensor | None]:
        n = len(self.roles)
        params, states = self.inputs(graph)
        if graph:  # connected to where they came from, but not inside this product
            products = self.unroll.products
            params = [_cut(p, products) for p in params]
            states = [_cut(s, products) for s in states]
        else:
            params = [p.detach().requires_grad_(f) for p, f in zip(params, self.p_flags)]
            states = [s.detach().requires_grad_(f) for s, f in zip(states, self.s_flags)]
        new_params, new_states = self.run(params, states, graph=True)
        outs = [new_params[i] for i in self.stepped] + new_states
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted: list[tuple[int, torch.Tensor]] = []
        for slot, roles in enumerate(self.roles):
            if not needs[slot]:
                continue
            seen: set[int] = set()
            for kind, where in roles:
                t = params[where] if kind == "p" else states[where] if kind == "s" else where
                if t.requires_grad and id(t) not in seen:
                    seen.add(id(t))
                    wanted.append((slot, t))
        result: list[torch.Tensor | None] = [None] * n
        if not pairs or not wanted:
            return result
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            [t for _, t in wanted],
            [g for _, g in pairs],
            allow_unused=True,
            create_graph=graph,
        )
        for (slot, _), g in zip(wanted, got):
            if g is not None:
                previous = result[slot]
                result[slot] = g if previous is None else previous + g
        return result

    def retire(self) -> None:
        """Leave the window of a truncated unroll: a constant from now on, holding nothing."""
        self.alive = False
        self.saved = None
        self.closure = None
        self.callback = None
        self.fingerprints = None
        self.env = None
        self.roles = [[] for _ in self.roles]  # what it held of the hyperparameters and data


def _tolerance(dtype: torch.dtype) -> float:
    """How far a rebuilt step may drift from the first run (round-off of other kernels)."""
    return 1e-10 if dtype == torch.float64 else 1e-5


class _Watched:
    """A step's grad_callback (or none), with a fingerprint of the gradients it was given and
    of those it returned: per gradient its sum and norm (and a bound of the sum's round-off),
    a few reductions per step instead of a copy of the gradients."""

    def __init__(self, callback: GradCallback | None) -> None:
        self.callback = callback
        self.given: list[torch.Tensor | None] = []
        self.returned: Sequence[torch.Tensor | None] = []

    def __call__(self, grads: list[torch.Tensor | None]) -> Sequence[torch.Tensor | None]:
        self.given = list(grads)
        self.returned = grads if self.callback is None else self.callback(grads)
        return self.returned

    def fingerprints(self) -> tuple[Fingerprint, Fingerprint]:
        given = _fingerprint(self.given)
        returned = given if self.callback is None else _fingerprint(self.returned)
        self.given, self.returned = [], []  # nothing of the step's gradients kept
        return given, returned


Fingerprint = list[torch.Tensor] | None


def _fingerprint(grads: object) -> Fingerprint:
    """`[sum, norm, sum's round-off bound]` of each gradient (NaN for a None), stacked per
    device (one small tensor a step, usually), taken without waiting for the device: it is
    read, on the host, only when the step is rebuilt."""
    if not isinstance(grads, (list, tuple)):
        return None
    rows: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():
        for g in grads:
            if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                row = torch.full((3,), float("nan"), dtype=torch.float64)
            else:
                dtype = torch.float32 if g.device.type == "mps" else torch.float64
                g = g.detach()
                norm = torch.linalg.vector_norm(g, dtype=dtype)
                row = torch.stack([g.sum(dtype=dtype), norm, norm * g.numel() ** 0.5])
            rows.setdefault(row.device, []).append(row)
        return [torch.stack(found) for found in rows.values()]


def _same(new: Fingerprint, old: Fingerprint, tol: float) -> bool:
    """Two fingerprints of one step's gradients agree, up to round-off (NaN equals NaN)."""
    if new is None or old is None:
        return new is None and old is None
    if [t.shape for t in new] != [t.shape for t in old]:
        return False  # a gradient is missing where it was not, or the other way round
    if not new:
        return True
    a = torch.cat([t.to("cpu", torch.float64) for t in new])
    b = torch.cat([t.to("cpu", torch.float64) for t in old])
    allowed = tol * (b[:, :2].abs() + b[:, 2:3])
    close = (a[:, :2] - b[:, :2]).abs() <= allowed
    same_nan = a[:, :2].isnan() & b[:, :2].isnan()
    exact = a[:, :2] == b[:, :2]  # zeros and infinities
    return bool((close | same_nan | exact).all())


class _Step(torch.autograd.Function):
    """The node of one recomputed step (its outputs were computed before it was made)."""

    @staticmethod
    def forward(ctx: Any, record: _Record, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.record = record
        ctx.set_materialize_grads(False)
        outs = record.outputs
        assert outs is not None
        record.outputs = None
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        record: _Record = ctx.record
        if record.unroll.products.depth:  # reached inside another step's own product: no path
            return (None,) * len(ctx.needs_input_grad)
        return (None, *record.backward(grads, ctx.needs_input_grad[1:]))


class _Cut(torch.autograd.Function):
    """The identity, except inside a step's own vector-Jacobian product: there the inputs of
    the step end the graph (the backward pass itself follows what lies behind them)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, products: _Products) -> torch.Tensor:
        ctx.products = products
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        return None if ctx.products.depth else grad, None


def _cut(t: torch.Tensor, products: _Products) -> torch.Tensor:
    if not t.requires_grad:
        return t
    out: torch.Tensor = _Cut.apply(t, products)  # type: ignore[no-untyped-call]
    return out


class _Sealed(torch.autograd.Function):
    """Weights an ended recompute unroll leaves in the functional model: a gradient through
    them is an error that says why, not a silent zero."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise UnrollError(
            "a loss computed from the functional model after its innerloop_ctx block ended "
            "has no gradient through a recompute or truncated unroll: the block's end lets go "
            "of the unroll (nothing leaks across inner loops). Compute the meta-loss inside "
            "the block; its backward may run after it"
        )


class RecomputeDriver:
    """Runs the steps of a `Recompute` or `Truncated` unroll."""

    def __init__(
        self,
        mode: Recompute | Truncated,
        fmodel: FunctionalModule,
        diffopt: DifferentiableOptimizer,
    ) -> None:
        self.mode = mode
        self.name = "'recompute'" if isinstance(mode, Recompute) else "higher.Truncated(...)"
        self.every = mode.every if isinstance(mode, Recompute) else 1
        self.window = mode.window if isinstance(mode, Truncated) else None
        self.check = mode.check
        self.fmodel = fmodel
        self.diffopt = diffopt
        self.env = Environment(fmodel)
        self.count = 0
        self.products = _Products()
        self.last: _Record | None = None
        #: ids of the last step's outputs: (weights, state leaves), to link the next step
        self.last_out: tuple[list[int], list[int]] = ([], [])
        self.recent: collections.deque[_Record] = collections.deque()

    def step(
        self,
        diffopt: DifferentiableOptimizer,
        loss: torch.Tensor | None,
        override: Mapping[str, Sequence[Any]] | None,
        grad_callback: GradCallback | None,
        closure: Callable[[], torch.Tensor] | None,
        kwargs: dict[str, Any],
    ) -> list[torch.Tensor]:
        closure = require_closure(self.name, loss, closure)
        callback = grad_callback if grad_callback is not None else diffopt.grad_callback
        watched = _Watched(callback) if self.check else None
        fmodel = self.fmodel
        params = fmodel.fast_params
        env = self.env.before()
        leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
        captures = Captures(leaves)
        with torch.enable_grad():
            with patch_internal.using(fmodel, leaves), captures:
                value = scalar_loss(closure())
                grads = diffopt.gradients(
                    value,
                    leaves,
                    create_graph=False,
                    grad_callback=callback if watched is None else watched,
                )
            outside = list(captures.found.values())
            roots = [value] + [g for g in grads if g is not None and g.grad_fn is not None]
            stray = unexpected_leaves(roots, leaves + outside, lambda node: False)
            captures.keep.clear()
        if stray:
            raise UnrollError(
                f"the loss of step {self.count} depends on a tensor that requires grad (shape "
                f"{tuple(stray[0].shape)}) in a way {self.name} could not follow (through an "
                "op torch's function hooks do not see): compute it inside the closure, or use "
                "unroll='full'"
            )
        env = self.env.after(env)
        stepped = [i for i, g in enumerate(grads) if g is not None]
        plan = internal.plan(diffopt, params, stepped=[g is not None for g in grads],
                             override=override, **kwargs)  # fmt: skip
        states, state_spec = flatten([b.state for b in plan.buckets])
        with torch.no_grad():
            result = plan.update(leaves, grads, unflatten(state_spec, [s.detach() for s in states]))
        new_states, out_spec = flatten(result.states)
        outputs = [result.params[i].detach() for i in stepped] + [s.detach() for s in new_states]
        seen_out: set[int] = set()
        for k, o in enumerate(outputs):  # one object per output
            if id(o) in seen_out:
                outputs[k] = o.clone()
            seen_out.add(id(outputs[k]))

        record = _Record(
            self,
            closure,
            callback,
            stripped(plan),
            env,
            value.detach(),
            stepped,
            [p.requires_grad for p in params],
            [s.requires_grad for s in states],
            state_spec,
            self.count,
            watched,
        )
        self._place(record, params, states)
        slots: list[torch.Tensor] = []
        where: dict[int, int] = {}

        def slot(t: torch.Tensor, role: tuple[str, Any]) -> None:
            if not t.requires_grad:
                return
            k = where.get(id(t))
            if k is None:
                k = where[id(t)] = len(slots)
                slots.append(t)
                record.roles.append([])
            record.roles[k].append(role)

        for i, p in enumerate(params):
            slot(p, ("p", i))
        for j, s in enumerate(states):
            slot(s, ("s", j))
        for t in hyper_tensors(plan) + outside:
            slot(t, ("x", t))
        record.outputs = outputs
        outs = _Step.apply(record, *slots)  # type: ignore[no-untyped-call]
        new_params = list(params)
        for k, i in enumerate(stepped):
            new_params[i] = outs[k]
        out_states = list(outs[len(stepped) :])
        committed = internal.commit(
            diffopt, plan, StepResult(new_params, unflatten(out_spec, out_states))
        )
        self.last_out = ([id(p) for p in committed], [id(s) for s in out_states])
        self.count += 1
        return committed

    def _place(self, record: _Record, params: Tensors, states: Tensors) -> None:
        """Make `record` the start of a new segment (its inputs kept) or the next step of the
        current one (its inputs linked to the previous step's outputs)."""
        previous = self.last
        if previous is None or self.count % self.every == 0 or not previous.alive:
            record.saved = (list(params), list(states))
        else:
            ids_p, ids_s = self.last_out
            pos_p = {k: i for i, k in enumerate(ids_p)}
            pos_s = {k: i for i, k in enumerate(ids_s)}

            def link(t: torch.Tensor) -> tuple[str, Any]:
                if id(t) in pos_p:
                    return ("p", pos_p[id(t)])
                if id(t) in pos_s:
                    return ("s", pos_s[id(t)])
                return ("k", t)

            record.p_links = [link(p) for p in params]
            record.s_links = [link(s) for s in states]
            record.segment = previous.segment
            record.previous = previous
        self.last = record
        if self.window is not None:
            self.recent.append(record)
            while len(self.recent) > self.window:
                self.recent.popleft().retire()

    def close(self, diffopt: DifferentiableOptimizer) -> None:
        """End the unroll: the functional model and the optimizer let go of its graph (their
        weights and state are detached), so that the unroll is freed with the last tensor that
        uses it, and a gradient through weights taken later is a clear error."""
        params = self.fmodel.fast_params
        sealed = [
            _Sealed.apply(p.detach().requires_grad_())  # type: ignore[no-untyped-call]
            if p.requires_grad
            else p.detach()
            for p in params
        ]
        plan = internal.plan(diffopt, params)
        states = [unflatten(spec, [s.detach() for s in leaves])
                  for leaves, spec in map(flatten, (b.state for b in plan.buckets))]  # fmt: skip
        internal.commit(diffopt, plan, StepResult(sealed, states))
        self.last = None
        self.recent.clear()
