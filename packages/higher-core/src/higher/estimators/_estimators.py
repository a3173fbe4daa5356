"""The estimators: ES over a whole unroll, PES and truncated ES over truncations, and truncated
backprop (the exact gradient of each truncation alone, for comparison)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from higher._errors import EstimatorError
from higher.estimators._particles import (
    Estimate,
    Init,
    Meta,
    Particles,
    Unroll,
    checked_meta,
    checked_out,
    detached,
)


class PES(Particles):
    """Persistent evolution strategies (Vicol, Metz and Sohl-Dickstein, ICML 2021): an unbiased
    estimate of the gradient of an inner problem's total loss (the sum of its truncations'
    losses) with respect to meta-parameters, from truncated unrolls and no backprop through
    them.

    Each particle runs the inner problem with its own perturbed copy of the meta-parameters,
    drawn anew at every truncation, and keeps its own state from one truncation to the next;
    its loss is weighed by the sum of every perturbation it ran with since the problem started.
    That sum is what makes the estimate unbiased across truncations, where truncated ES
    (`TruncatedES`) and truncated backprop (`TruncatedBackprop`) are not. The sum of the
    estimates of a problem's truncations estimates the gradient of its total loss as ES over
    the full unroll does.

    `unroll(meta, state, *data, **kwargs) -> (new_state, loss)` runs one truncation of one
    particle (its meta-parameters a list of tensors; the state a tree of tensors and Python
    values, the latter the same for every particle); `init(meta) -> state` starts one. With
    `vectorize` (the default) all particles run as one batch under `torch.func.vmap` (the
    unroll then takes its inner gradients with `torch.func.grad`, and reads no tensor as a
    Python number); `vectorize=False` runs them one by one. `particles` perturbed unrolls (in
    antithetic pairs, +e and -e, unless `antithetic=False`), entries of each perturbation drawn
    from N(0, sigma^2) by a generator seeded with `seed`. With `group` (a torch.distributed
    process group, or the default group when initialized) each rank runs its share of the
    draws and the estimate is the same as one process computes.

    Examples:
        >>> import torch, higher.estimators as est
        >>> unroll = lambda meta, s: (s + meta[0], ((s + meta[0]) ** 2).sum())  # s_t = t θ
        >>> pes = est.PES(unroll, lambda meta: torch.zeros(()), particles=1024, sigma=0.1,
        ...               seed=0)
        >>> theta = [torch.tensor(1.0, dtype=torch.float64)]
        >>> steps = [pes.step(theta) for _ in range(3)]  # three truncations of one step
        >>> round(sum(e.grads[0] for e in steps).item(), 1)  # d/dθ Σ_t (tθ)^2 = 28θ
        27.2
        >>> round(steps[-1].stderr[0].item(), 1)
        1.3
    """

    persistent = True
    shared_start = False


class TruncatedES(Particles):
    """Truncated evolution strategies: each truncation's antithetic ES estimate of the gradient
    of that truncation's loss, from the state the unperturbed meta-parameters reach (one more
    unroll per truncation carries it). Biased: it ignores how the meta-parameters moved the
    state before the truncation (what `PES` accounts for). The same arguments as `PES`.

    Examples:
        >>> import torch, higher.estimators as est
        >>> unroll = lambda meta, s: (s + meta[0], ((s + meta[0]) ** 2).sum())  # s_t = t θ
        >>> tes = est.TruncatedES(unroll, lambda meta: torch.zeros(()), particles=1024,
        ...                       sigma=0.1, seed=0)
        >>> theta = [torch.tensor(1.0, dtype=torch.float64)]
        >>> total = sum(tes.step(theta).grads[0] for _ in range(3))  # 2 + 4 + 6, not 28
        >>> round(total.item(), 1)
        11.5
    """

    persistent = False
    shared_start = True


class TruncatedBackprop:
    """Truncated backprop through time: the exact gradient (autograd) of each truncation's loss
    with respect to the meta-parameters, the state detached at the truncation's start. Biased
    the same way as `TruncatedES`; cheap and with no variance (`stderr` is zeros). The same
    `unroll` and `init` as `PES`; the unroll must be differentiable (torch.func.grad inside
    is).

    Examples:
        >>> import torch, higher.estimators as est
        >>> unroll = lambda meta, s: (s + meta[0], ((s + meta[0]) ** 2).sum())  # s_t = t θ
        >>> tbptt = est.TruncatedBackprop(unroll, lambda meta: torch.zeros(()))
        >>> theta = [torch.tensor(1.0)]
        >>> [tbptt.step(theta).grads[0].item() for _ in range(3)]  # d/dθ (s + θ)^2, s fixed
        [2.0, 4.0, 6.0]
    """

    def __init__(self, unroll: Unroll, init: Init) -> None:
        if not callable(unroll) or not callable(init):
            raise EstimatorError("TruncatedBackprop: unroll and init must be callable")
        self._unroll, self._init = unroll, init
        self._state: Any = None
        self._total: Estimate | None = None

    def reset(self) -> None:
        """Start a new inner problem: the next `step` starts from `init`."""
        self._state, self._total = None, None

    def accumulated(self) -> Estimate:
        """The sum of the estimates since the inner problem started (as `PES.accumulated`).

        Examples:
            >>> import torch, higher.estimators as est
            >>> unroll = lambda meta, s: (s + meta[0], ((s + meta[0]) ** 2).sum())  # s_t = t θ
            >>> tbptt = est.TruncatedBackprop(unroll, lambda meta: torch.zeros(()))
            >>> _ = [tbptt.step([torch.tensor(1.0)]) for _ in range(3)]
            >>> tbptt.accumulated().grads[0].item()  # 2 + 4 + 6
            12.0
        """
        if self._total is None:
            raise EstimatorError(
                "TruncatedBackprop.accumulated: no truncation has run since the inner problem "
                "started; call step() first"
            )
        return self._total

    def step(self, meta: Meta, *data: Any, **kwargs: Any) -> Estimate:
        """Run one truncation from the carried state (detached) at `meta`, and return the
        gradient of its loss (the first truncation's also through `init`)."""
        live = [m.requires_grad_() for m in checked_meta(meta, "TruncatedBackprop")]
        with torch.enable_grad():
            # the problem has started once a truncation has run (and been summed)
            state = self._init(live) if self._total is None else self._state
            out = self._unroll(live, state, *data, **kwargs)
            new_state, loss = checked_out(out, "TruncatedBackprop")
            found: Sequence[torch.Tensor | None] = [None] * len(live)
            if loss.requires_grad:
                found = torch.autograd.grad(loss, live, allow_unused=True)
        grads = [torch.zeros_like(m) if g is None else g for m, g in zip(live, found)]
        self._state = detached(new_state)
        zeros = [torch.zeros_like(g) for g in grads]
        step = Estimate(grads, zeros, loss.detach(), 1)
        total = self._total
        self._total = (
            step
            if total is None
            else Estimate(
                [a + b for a, b in zip(total.grads, grads)], zeros, total.loss + step.loss, 1
            )
        )
        return step


def es_gradient(
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    meta: Meta,
    *,
    particles: int = 16,
    sigma: float = 0.01,
    antithetic: bool = True,
    seed: int | None = None,
    vectorize: bool = True,
    group: Any = None,
) -> Estimate:
    """Antithetic ES over a whole unroll: the gradient at `meta` of the Gaussian smoothing of
    `fn` (`E[fn(meta + e)]`, `e ~ N(0, sigma^2)`), estimated from `particles` evaluations of
    `fn(meta) -> loss` (a 0-d tensor; the settings as for `PES`), with its standard error. No
    backprop runs through `fn`: it may unroll any number of steps, and a chaotic loss gives the
    gradient of its smoothing, not of its noise.

    Examples:
        >>> import torch, higher.estimators as est
        >>> meta = [torch.tensor(0.5, dtype=torch.float64)]
        >>> e = est.es_gradient(lambda m: torch.sin(m[0]), meta, particles=1024, sigma=0.05,
        ...                     seed=0)  # cos(0.5) = 0.878
        >>> round(e.grads[0].item(), 2), round(e.stderr[0].item(), 2)
        (0.88, 0.06)
    """
    if not callable(fn):
        raise EstimatorError(f"es_gradient: fn must be callable, got {type(fn).__name__}")

    def unroll(m: list[torch.Tensor], state: tuple[()]) -> tuple[tuple[()], torch.Tensor]:
        return state, fn(m)

    estimator = PES(
        unroll, lambda m: (), particles=particles, sigma=sigma, antithetic=antithetic,
        seed=seed, vectorize=vectorize, group=group,
    )  # fmt: skip
    return estimator.step(meta)
