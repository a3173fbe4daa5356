"""Perturbed particles: their noise, the batched run of one truncation, and the estimate.

Every estimator of this package is one loop: draw the noise of this truncation, run the unroll
once per particle (one `torch.func.vmap` call for all of them, or a Python loop), and turn the
particles' losses into a gradient estimate and its standard error. What differs between ES, PES
and truncated ES is only which perturbation a particle's loss is weighed by (this truncation's,
or every one since the inner problem started) and where a particle starts a truncation (its own
state, or the unperturbed trajectory's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from higher._errors import EstimatorError
from higher._trees import Spec, flatten, map_leaves, unflatten
from higher.distributed import shard, world

Meta = Sequence[torch.Tensor]
#: `unroll(meta, state, *data, **kwargs) -> (new_state, loss)`: one truncation of one particle
Unroll = Callable[..., tuple[Any, torch.Tensor]]
#: `init(meta) -> state`: where an inner problem starts
Init = Callable[[list[torch.Tensor]], Any]


class Estimate(NamedTuple):
    """A gradient estimate: `grads` (one tensor per meta-parameter, of its shape), the standard
    error of each of their entries (`stderr`: the spread of the independent draws the estimate
    averages, over the square root of their number; zeros for an exact gradient), the mean loss
    of the particles it ran (`loss`, 0-d) and how many unrolls ran (`particles`).

    Examples:
        >>> import torch, higher.estimators as est
        >>> meta = [torch.tensor([1.0, -2.0], dtype=torch.float64)]
        >>> e = est.es_gradient(lambda m: (m[0] ** 2).sum(), meta, particles=1024, sigma=0.1,
        ...                     seed=0)
        >>> [round(v, 2) for v in e.grads[0].tolist()], e.particles  # d/dm |m|^2 = [2, -4]
        ([1.96, -3.91], 1024)
        >>> [round(v, 2) for v in e.stderr[0].tolist()]
        [0.21, 0.27]
    """

    grads: list[torch.Tensor]
    stderr: list[torch.Tensor]
    loss: torch.Tensor
    particles: int

    def to_grad(self, meta: Sequence[torch.Tensor]) -> None:
        """Add `grads` into each tensor's `.grad`, as `backward()` would, so that an ordinary
        optimizer over `meta` can step on the estimate.

        Examples:
            >>> import torch, higher.estimators as est
            >>> w = torch.zeros(2, requires_grad=True)
            >>> est.Estimate([torch.ones(2)], [torch.zeros(2)], torch.tensor(0.0), 1).to_grad([w])
            >>> w.grad.tolist()
            [1.0, 1.0]
        """
        meta = list(meta)
        if len(meta) != len(self.grads):
            raise EstimatorError(
                f"to_grad got {len(meta)} tensors for an estimate of {len(self.grads)}: pass the "
                "meta-parameters the estimate was made for, in the same order"
            )
        for i, (m, g) in enumerate(zip(meta, self.grads)):
            if not isinstance(m, torch.Tensor) or m.shape != g.shape:
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise EstimatorError(
                    f"meta-parameter {i} is {shape}; the estimate's gradient {i} has shape "
                    f"{tuple(g.shape)}"
                )
            with torch.no_grad():
                if m.grad is None:
                    m.grad = g.detach().to(m.dtype).clone()
                else:
                    m.grad.add_(g.to(m.grad.dtype))


class Carry(NamedTuple):
    """What the particles carry between truncations: their state's structure (and its Python
    values, one for all particles) and its tensors, with a leading particle dimension when
    `batched`."""

    spec: Spec
    leaves: list[torch.Tensor]
    batched: bool

    def particle(self, index: int) -> Carry:
        """The carry of one particle, unbatched."""
        return Carry(self.spec, [leaf[index] for leaf in self.leaves], False)


def checked_meta(meta: object, name: str) -> list[torch.Tensor]:
    """`meta` as a list of detached floating-point tensors, or an `EstimatorError` saying what
    was wrong."""
    if isinstance(meta, torch.Tensor) or not isinstance(meta, (list, tuple)):
        raise EstimatorError(
            f"{name}: meta must be a list of tensors (the meta-parameters), got "
            f"{type(meta).__name__}; wrap a single tensor as [tensor]"
        )
    if not meta:
        raise EstimatorError(f"{name}: meta is empty; give at least one meta-parameter")
    for i, m in enumerate(meta):
        if not isinstance(m, torch.Tensor) or not m.is_floating_point():
            what = f"a {m.dtype} tensor" if isinstance(m, torch.Tensor) else type(m).__name__
            raise EstimatorError(
                f"{name}: meta-parameter {i} is {what}; expected a floating-point tensor"
            )
    return [m.detach() for m in meta]


def checked_out(out: object, name: str) -> tuple[Any, torch.Tensor]:
    """What an unroll returned, `(new_state, loss)` with the loss as a 0-d tensor, or an
    `EstimatorError` saying what was wrong."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise EstimatorError(
            f"{name}: unroll must return (new_state, loss), got {type(out).__name__}"
        )
    new_state, loss = out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise EstimatorError(
            f"{name}: unroll must return one loss per particle (a tensor of one element), "
            f"got {shape}"
        )
    return new_state, loss.reshape(())


def run_particles(
    unroll: Unroll,
    init: Init,
    metas: list[torch.Tensor],
    carry: Carry | None,
    data: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    vectorize: bool,
    name: str,
) -> tuple[Carry, torch.Tensor]:
    """One truncation for every particle: `metas` stack the particles' meta-parameters along a
    first dimension; each particle starts from `carry` (its own slice when batched, the same
    state for all when not; `init` of its own meta-parameters when None) and runs
    `unroll(meta, state, *data, **kwargs)`. Returns the particles' new states (batched) and
    their losses (one per particle)."""
    specs: list[Spec] = []
    n = metas[0].shape[0]
    if carry is None:  # every particle starts from init of its own meta-parameters
        carry = _started(init, metas, vectorize=vectorize, name=name)
    elif not carry.batched:  # one state for all: as many views of it as there are particles
        carry = Carry(carry.spec, [leaf.expand(n, *leaf.shape) for leaf in carry.leaves], True)
    spec = carry.spec

    def one(meta: list[torch.Tensor], leaves: list[torch.Tensor]) -> Any:
        out = unroll(list(meta), unflatten(spec, list(leaves)), *data, **kwargs)
        new_state, loss = checked_out(out, name)
        new_leaves, new_spec = flatten(new_state)
        specs.append(new_spec)
        return new_leaves, loss

    new_leaves, losses = _each(one, metas, carry.leaves, vectorize=vectorize)
    _same(specs, name)
    return Carry(specs[0], new_leaves, True), losses


def _started(init: Init, metas: list[torch.Tensor], *, vectorize: bool, name: str) -> Carry:
    """Each particle's `init` of its own meta-parameters, batched (a state that does not depend
    on them, such as running statistics, is expanded: every particle updates its own)."""
    specs: list[Spec] = []

    def one(meta: list[torch.Tensor], _: list[torch.Tensor]) -> Any:
        leaves, spec = flatten(init(list(meta)))
        specs.append(spec)
        return leaves, meta[0].new_zeros(())

    leaves, _ = _each(one, metas, [], vectorize=vectorize)
    _same(specs, name)
    return Carry(specs[0], leaves, True)


def _each(
    one: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    metas: list[torch.Tensor],
    leaves: list[torch.Tensor],
    *,
    vectorize: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`one(meta, leaves) -> (leaves, loss)` for every particle (the first dimension of `metas`
    and `leaves`): one vmapped call, or a loop; the outputs stacked."""
    if vectorize:
        run = torch.func.vmap(one, in_dims=(0, 0), randomness="different")
        new_leaves, losses = run(metas, leaves)
        return list(new_leaves), losses
    outs = [
        one([m[i] for m in metas], [leaf[i] for leaf in leaves]) for i in range(metas[0].shape[0])
    ]
    stacked = [torch.stack(column) for column in zip(*(new for new, _ in outs))]
    return stacked, torch.stack([loss for _, loss in outs])


def _same(specs: list[Spec], name: str) -> None:
    """Refuse particles whose states differ beyond their tensors (a loop can tell)."""
    for spec in specs[1:]:
        if spec != specs[0]:
            raise EstimatorError(
                f"{name}: the particles' states differ in more than their tensors (structure "
                "or Python values such as step counts); every particle's state must have the "
                "same structure and the same non-tensor values"
            )


def detached(tree: Any) -> Any:
    """`tree` with every tensor detached (a truncation's boundary)."""
    return map_leaves(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def agreed_seed(seed: int | None, group: Any) -> int:
    """`seed`, or one drawn from torch's global generator (rank 0's, broadcast to every rank of
    `group`, so that all ranks draw the same noise)."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EstimatorError(f"seed must be an int or None, got {type(seed).__name__}")
        return seed
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if world(group).size > 1:
        dist.broadcast(drawn, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return int(drawn.item())


class Draws(NamedTuple):
    """The independent draws of one estimate on this rank: per meta-parameter, one row per
    draw (an antithetic pair, or a particle), and the losses of this rank's particles."""

    rows: list[torch.Tensor]
    losses: torch.Tensor


def summarize(draws: Draws, total: int, group: Any) -> tuple[list[Any], list[Any], Any]:
    """The mean of the `total` draws over every rank of `group` (each rank holds its share),
    the standard error of that mean (two passes: the spread around the mean, exactly), and the
    particles' mean loss."""
    size = world(group).size

    def reduced(parts: list[torch.Tensor]) -> list[torch.Tensor]:
        if size == 1:
            return parts
        flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        dist.all_reduce(flat, group=group)
        out, start = [], 0
        for p in parts:
            out.append(flat[start : start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        return out

    losses = draws.losses.to(torch.float64)
    count = losses.new_tensor(losses.numel())
    sums = reduced([r.sum(0) for r in draws.rows] + [losses.sum(), count])
    means = [s / total for s in sums[: len(draws.rows)]]
    loss = (sums[-2] / sums[-1]).to(draws.losses.dtype)
    squares = reduced([((r - m) ** 2).sum(0) for r, m in zip(draws.rows, means)])
    stderr = [(sq / (total - 1) / total).sqrt() for sq in squares]
    return means, stderr, loss


class Particles:
    """The machinery every perturbation estimator shares: its settings, its noise and, across
    truncations, the particles' states and accumulated perturbations. Subclasses say whether
    the perturbations accumulate (`persistent`) and whether particles start each truncation
    from the unperturbed trajectory (`shared_start`)."""

    persistent = True
    shared_start = False

    def __init__(
        self,
        unroll: Unroll,
        init: Init,
        *,
        particles: int = 16,
        sigma: float = 0.01,
        antithetic: bool = True,
        seed: int | None = None,
        vectorize: bool = True,
        group: Any = None,
    ) -> None:
        name = type(self).__name__
        if not callable(unroll) or not callable(init):
            raise EstimatorError(f"{name}: unroll and init must be callable")
        if isinstance(particles, bool) or not isinstance(particles, int):
            raise EstimatorError(f"{name}: particles must be an int, got {particles!r}")
        if antithetic and (particles < 4 or particles % 2):
            raise EstimatorError(
                f"{name}: antithetic particles come in pairs, so particles must be an even "
                f"number >= 4 (two pairs give a standard error), got {particles}"
            )
        if not antithetic and particles < 2:
            raise EstimatorError(
                f"{name}: particles must be >= 2 (two draws give a standard error), got {particles}"
            )
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, (int, float))
            or not math.isfinite(sigma)
            or sigma <= 0
        ):
            raise EstimatorError(f"{name}: sigma must be a finite number > 0, got {sigma!r}")
        for flag, value in (("antithetic", antithetic), ("vectorize", vectorize)):
            if not isinstance(value, bool):
                raise EstimatorError(f"{name}: {flag} must be a bool, got {value!r}")
        self._unroll, self._init = unroll, init
        self._particles, self._sigma = particles, float(sigma)
        self._antithetic, self._vectorize, self._group = antithetic, vectorize, group
        self._draws = particles // 2 if antithetic else particles
        self._mine = shard(self._draws, group=group)
        self._seed = agreed_seed(seed, group)
        self._generator: torch.Generator | None = None
        self._carry: Carry | None = None
        self._xi: list[torch.Tensor] | None = None
        self._total: Draws | None = None

    @property
    def particles(self) -> int:
        """The number of perturbed unrolls of one estimate (over all ranks)."""
        return self._particles

    @property
    def sigma(self) -> float:
        """The standard deviation of each perturbation's entries."""
        return self._sigma

    def reset(self) -> None:
        """Start a new inner problem: at the next `step` every particle starts again from
        `init`, and the accumulated perturbations are cleared."""
        self._carry = None
        self._xi = None
        self._total = None

    def step(self, meta: Meta, *data: Any, **kwargs: Any) -> Estimate:
        """Run one truncation of every particle on `data` (shared by all particles) at `meta`,
        and return this truncation's gradient estimate."""
        name = type(self).__name__
        meta = checked_meta(meta, name)
        eps = self._noise(meta)
        xi = eps
        if self.persistent and self._xi is not None:
            if [x.shape[1:] for x in self._xi] != [m.shape for m in meta]:
                raise EstimatorError(
                    f"{name}: the meta-parameters changed shape since the inner problem "
                    "started; call reset() before a step with other meta-parameters"
                )
            xi = [x + e for x, e in zip(self._xi, eps)]
        if self._antithetic:
            metas = [torch.cat([m + e, m - e]) for m, e in zip(meta, eps)]
        else:
            metas = [m + e for m, e in zip(meta, eps)]
        if self.shared_start:  # one more particle: the unperturbed trajectory
            metas = [torch.cat([p, m.unsqueeze(0)]) for p, m in zip(metas, meta)]
        if metas[0].shape[0]:
            carry, losses = run_particles(
                self._unroll, self._init, metas, self._carry, data, kwargs,
                vectorize=self._vectorize, name=name,
            )  # fmt: skip
            self._carry = carry.particle(-1) if self.shared_start else carry
            losses = losses[:-1] if self.shared_start else losses
        else:  # more ranks than draws: this rank has none
            losses = meta[0].new_zeros(0)
        if self.persistent:
            self._xi = xi
        losses = losses.detach()
        n = len(self._mine)
        scale = self._sigma**2
        weight = (losses[:n] - losses[n:]) / (2 * scale) if self._antithetic else losses / scale
        rows = [x * weight.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype) for x in xi]
        total = self._total
        if total is None:
            self._total = Draws(rows, losses)
        else:  # each draw's sum over the truncations (one particle's, or one pair's)
            self._total = Draws([a + b for a, b in zip(total.rows, rows)], total.losses + losses)
        grads, stderr, loss = summarize(Draws(rows, losses), self._draws, self._group)
        return Estimate(grads, stderr, loss, self._particles)

    def accumulated(self) -> Estimate:
        """The estimate of the gradient of the total loss of every truncation since the inner
        problem started (the last `reset`): the sum of their estimates, with the standard error
        of that sum. The truncations of one problem run on the same particles, so their
        estimates are correlated and their standard errors do not add up; this one is the
        spread of each draw's own sum. `loss` is the particles' mean total loss.

        Examples:
            >>> import torch, higher.estimators as est
            >>> unroll = lambda meta, s: (s + meta[0], ((s + meta[0]) ** 2).sum())  # s_t = t θ
            >>> pes = est.PES(unroll, lambda meta: torch.zeros(()), particles=1024, sigma=0.1,
            ...               seed=0)
            >>> theta = [torch.tensor(1.0, dtype=torch.float64)]
            >>> _ = [pes.step(theta) for _ in range(3)]
            >>> total = pes.accumulated()  # d/dθ Σ_t (tθ)^2 = 28θ
            >>> round(total.grads[0].item(), 1), round(total.stderr[0].item(), 1)
            (27.2, 1.7)
        """
        if self._total is None:
            raise EstimatorError(
                f"{type(self).__name__}.accumulated: no truncation has run since the inner "
                "problem started; call step() first"
            )
        grads, stderr, loss = summarize(self._total, self._draws, self._group)
        return Estimate(grads, stderr, loss, self._particles)

    def _noise(self, meta: list[torch.Tensor]) -> list[torch.Tensor]:
        """This truncation's perturbations of this rank's draws: every rank draws all of them
        from the same generator and keeps its share, so the estimate does not depend on how
        many ranks share it."""
        device = meta[0].device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        start, stop = self._mine.start, self._mine.stop
        out = []
        for m in meta:
            full = torch.randn(
                (self._draws, *m.shape), generator=self._generator, dtype=m.dtype, device=device
            )
            out.append(full[start:stop] * self._sigma)
        return out
