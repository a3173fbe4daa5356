"""Hypergradients at an inner optimum by the implicit function theorem, without the unroll.

At a solution `θ*` of the inner problem, `F(θ*, λ) = 0` (for a minimum, `F = ∇_θ f`). Then
`dθ*/dλ = -J⁻¹ ∂F/∂λ` with `J = ∂F/∂θ`, and for an outer loss `g(θ*, λ)`

    dg/dλ = ∂g/∂λ - (∂F/∂λ)ᵀ w,   where   Jᵀ w = ∇_θ g.

`Jᵀ w` is one vector-Jacobian product of `F` (for `F = ∇f`, a Hessian-vector product by double
backward), so the system is solved by a `LinearSolver` from such products alone, and the last
term is one more product. Nothing of how `θ*` was found enters: no unroll, no path — which is
also why the point is checked: the formula holds only where `F(θ, λ) = 0`, so the distance from
the given point to one is estimated (`Stationarity`) and reported above a tolerance. Non-finite
numbers give NaN hypergradients, never finite ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from torch.autograd.function import once_differentiable

from higher._errors import ImplicitError, UsageError
from higher._torch_warnings import ignore_torch_self_deprecation
from higher._trees import map_leaves
from higher.errors import HigherWarning
from higher.implicit._linsolve import CG, LinearSolver, SolveResult
from higher.patch import FunctionalModule

Loss = Callable[[Any, Any], torch.Tensor]
Solution = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | FunctionalModule
Hyper = torch.Tensor | Sequence[torch.Tensor]
Reduction = Literal["mean", "sum"]
SolverFn = TypeVar("SolverFn", bound=Callable[..., Any])

_PERFORMANCE_DROP = "There is a performance drop because we have not yet implemented the batching"

#: The default `stationarity_tol`: the estimated distance to the stationary point may be this
#: fraction of |params| (or of 1, for a solution smaller than 1).
STATIONARITY_TOL = 1e-3


class Stationarity(NamedTuple):
    """How far the given solution is from a stationary point (a root of the optimality condition
    `F`; for `hypergrad`, `F = ∇_θ inner_loss`), where the implicit function theorem holds.

    `distance = |F|² / |Jᵀ F|` (`J = ∂F/∂θ`, one more product) estimates how far the point is
    from the root: to first order it never exceeds the Newton step `|J⁻¹ F|`, so a point it
    reports far is far. It is compared with `threshold = stationarity_tol · max(|θ|, 1)`.

    Examples:
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> inner = lambda t, lam: (t - 1) ** 2 / 2 + lam * t**2 / 2  # minimum at t = 0.5
        >>> check = higher.implicit.hypergrad(inner, lambda t, lam: t, torch.tensor(0.5),
        ...                                   lam).stationarity[0]
        >>> check.grad_norm, check.distance, check.stationary
        (0.0, 0.0, True)
    """

    #: `|F(θ)|`, the 2-norm over all the solution's tensors: for `hypergrad`, of the inner loss's
    #: gradient at `params`; for `custom_root`, of `optimality_fn`'s residual
    grad_norm: float
    #: `|F|² / |Jᵀ F|`: the estimated distance from the solution to the stationary point
    #: (0 at one; inf where `J` vanishes along `F`; NaN where `F` is not finite)
    distance: float
    #: `stationarity_tol · max(|θ|, 1)`; inf when the check is off (`stationarity_tol=None`)
    threshold: float

    @property
    def stationary(self) -> bool:
        """`distance <= threshold` (False when `distance` is NaN)."""
        return self.distance <= self.threshold


class NotStationaryError(ImplicitError):
    """The point given as the inner problem's solution is not stationary, with the solver's
    `on_fail="raise"` (also a `ValueError`): the implicit hypergradient would be wrong there.
    `stationarity` is the `Stationarity` measured.

    Examples:
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> inner = lambda t, lam: (t - 1) ** 2 / 2 + lam * t**2 / 2  # minimum at t = 0.5
        >>> try:
        ...     higher.implicit.hypergrad(inner, lambda t, lam: t, torch.tensor(0.9), lam,
        ...                               solver=higher.implicit.CG(on_fail="raise"))
        ... except higher.implicit.NotStationaryError as err:
        ...     print(round(err.stationarity.distance, 6))
        0.4
    """

    __module__ = "higher.implicit"  # its public path, for tracebacks, pickle and the docs

    def __init__(self, message: str, stationarity: Stationarity) -> None:
        super().__init__(message)
        self.stationarity = stationarity

    def __reduce__(self) -> tuple[type, tuple[str, Stationarity]]:  # pickles with its record
        return type(self), (str(self), self.stationarity)


class NotStationaryWarning(HigherWarning):
    """The point given as the inner problem's solution is not stationary (the solver's
    `on_fail="warn"`, the default): the hypergradient is computed there, but the implicit
    function theorem holds only at a stationary point, so its error grows with the distance.
    `stationarity` is the `Stationarity` measured.

    Examples:
        >>> import warnings
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> inner = lambda t, lam: (t - 1) ** 2 / 2 + lam * t**2 / 2  # minimum at t = 0.5
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     _ = higher.implicit.hypergrad(inner, lambda t, lam: t, torch.tensor(0.9), lam)
        >>> round(seen[0].message.stationarity.grad_norm, 6)
        0.8
    """

    __module__ = "higher.implicit"  # its public path, for tracebacks, pickle and the docs

    def __init__(self, message: str, stationarity: Stationarity) -> None:
        super().__init__(message)
        self.stationarity = stationarity

    def __reduce__(self) -> tuple[type, tuple[str, Stationarity]]:  # pickles with its record
        return type(self), (str(self), self.stationarity)


class Hypergrad(NamedTuple):
    """The hypergradient and the linear solve(s) behind it (returned by `hypergrad` and
    `hypergrad_batch`).

    Examples:
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> result = higher.implicit.hypergrad(
        ...     lambda t, lam: (t - 1) ** 2 / 2 + lam * t**2 / 2, lambda t, lam: t,
        ...     torch.tensor(0.5), lam)
        >>> result.grads[0].item(), result.solves[0].converged
        (-0.25, True)
    """

    #: d outer / d hyper, one tensor per hyperparameter (in the order given)
    grads: list[torch.Tensor]
    #: one `SolveResult` per inner problem (one task: one)
    solves: list[SolveResult]
    #: one `Stationarity` per inner problem: how far its solution is from a stationary point
    stationarity: list[Stationarity]


class Task(NamedTuple):
    """One inner problem of a batch (see `hypergrad_batch`): its losses and its solution.

    Examples:
        >>> task = higher.implicit.Task(lambda t, lam: (t - 1) ** 2 + lam * t**2,
        ...                             lambda t, lam: t, torch.tensor(0.5))
        >>> task.params.item()
        0.5
    """

    #: `inner_loss(params, hyper)`: the objective the solution minimizes
    inner_loss: Loss
    #: `outer_loss(params, hyper)`: the loss whose hypergradient is wanted
    outer_loss: Loss
    #: the solution: as in `hypergrad`
    params: Solution


# ---- the implicit vector-Jacobian product ------------------------------------------------------


class _Operator:
    """`v -> Jᵀ v` for the residual `F` (tensors shaped as the solution) at the solution: one
    backward through the graph of `F`, kept for the next product."""

    def __init__(
        self, residual: Sequence[torch.Tensor], solution: Sequence[torch.Tensor], what: str
    ) -> None:
        self.what = what
        self.live = [i for i, r in enumerate(residual) if r.requires_grad]
        self.residual = [residual[i] for i in self.live]
        self.solution = list(solution)
        self.shapes = [t.shape for t in solution]
        self.numels = [t.numel() for t in solution]

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [c.view(s) for c, s in zip(v.split(self.numels), self.shapes)]

    def _flat(self, grads: Sequence[torch.Tensor | None], lead: tuple[int, ...]) -> torch.Tensor:
        if all(g is None for g in grads):
            raise ImplicitError(
                f"{self.what}: the optimality condition does not depend on the solution (an "
                "inner loss linear in params has no curvature, so no minimum to differentiate)"
            )
        like = self.solution[0]
        return torch.cat(
            [
                g.reshape(*lead, -1) if g is not None else like.new_zeros(*lead, n)
                for g, n in zip(grads, self.numels)
            ],
            dim=-1,
        )

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return torch.zeros_like(v)
        parts = self.split(v)
        grads = torch.autograd.grad(
            self.residual,
            self.solution,
            [parts[i] for i in self.live],
            retain_graph=True,
            allow_unused=True,
        )
        return self._flat(grads, ())

    def matmat(self, rows: torch.Tensor) -> torch.Tensor:
        """Row `j` of the result is `Jᵀ rows[j]`: forward-mode over the backward (one batched
        pass), else one batched backward, else one product per row (whichever the ops allow)."""
        if not self.residual:
            return torch.zeros_like(rows)
        with warnings.catch_warnings():
            # ops without a batching rule fall back to a loop inside torch, and say so
            warnings.filterwarnings("ignore", message=_PERFORMANCE_DROP)
            ignore_torch_self_deprecation()
            for build in (self._forward_over_reverse, self._batched_backward):
                try:
                    return build(rows)
                except (RuntimeError, NotImplementedError):
                    continue  # an op lacks the formula this way needs: try the next way
        return torch.stack([self(row) for row in rows])

    def _forward_over_reverse(self, rows: torch.Tensor) -> torch.Tensor:
        # the product is linear in v: its derivative along u (at v = 0) is the product with u
        zero = torch.zeros_like(rows[0])

        def column(u: torch.Tensor) -> torch.Tensor:
            tangent: torch.Tensor = torch.func.jvp(self, (zero,), (u,))[1]
            return tangent

        out: torch.Tensor = torch.func.vmap(column)(rows)
        return out

    def _batched_backward(self, rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0]
        parts = [c.reshape(k, *s) for c, s in zip(rows.split(self.numels, dim=1), self.shapes)]
        grads = torch.autograd.grad(
            self.residual,
            self.solution,
            [parts[i] for i in self.live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        return self._flat(grads, (k,))


def _stationarity(
    operator: _Operator, residual: Sequence[torch.Tensor], tol: float | None
) -> Stationarity:
    """Measure how far the solution is from a root of `F` (one product `Jᵀ F`)."""
    f = torch.cat([r.detach().reshape(-1) for r in residual])
    grad_norm = float(torch.linalg.vector_norm(f))
    size = float(
        torch.linalg.vector_norm(torch.cat([t.detach().reshape(-1) for t in operator.solution]))
    )
    threshold = math.inf if tol is None else tol * max(size, 1.0)
    if not math.isfinite(grad_norm) or grad_norm == 0:
        return Stationarity(grad_norm, math.nan if grad_norm != 0 else 0.0, threshold)
    with torch.no_grad():
        curvature = float(torch.linalg.vector_norm(operator(f)))
    distance = grad_norm**2 / curvature if curvature > 0 else math.inf
    return Stationarity(grad_norm, distance, threshold)


def _report_stationarity(check: Stationarity, tol: float | None, on_fail: str, what: str,
                         point: str) -> None:  # fmt: skip
    """Warn or raise (by the solver's `on_fail`) when the point is not stationary."""
    if check.stationary or not math.isfinite(check.grad_norm):  # NaN: the solve reports it
        return
    message = (
        f"{what}: {point}: |F| = {check.grad_norm:.3e}, an estimated distance of "
        f"{check.distance:.3e} to the nearest root > {check.threshold:.3e} (stationarity_tol · "
        f"max(|solution|, 1) = {tol:g} · {check.threshold / tol if tol else 0:.3e}); the implicit "
        "hypergradient is exact only at a stationary point and its error grows with the distance: "
        "solve the inner problem further (more iterations, a tighter tolerance), or pass a "
        "larger stationarity_tol (None turns the check off)"
    )
    if on_fail == "raise":
        raise NotStationaryError(message, check)
    warnings.warn(NotStationaryWarning(message, check), stacklevel=5)


def _implicit_vjp(
    residual: Sequence[torch.Tensor],
    solution: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangent: Sequence[torch.Tensor],
    solver: LinearSolver,
    what: str,
    check: tuple[float | None, str],
) -> tuple[list[torch.Tensor | None], SolveResult, Stationarity]:
    """`(∂F/∂inputs)ᵀ w` with `Jᵀ w = cotangent` (the sign is the caller's), the solve, and the
    solution's `Stationarity` (`check`: the tolerance and how to name the point), reported
    before the solve. NaN or inf in `cotangent`, `F` or the solve make every entry NaN."""
    operator = _Operator(residual, solution, what)
    tol, point = check
    stationarity = _stationarity(operator, residual, tol)
    _report_stationarity(stationarity, tol, getattr(solver, "on_fail", "warn"), what, point)
    b = torch.cat([c.reshape(-1) for c in cotangent])
    result = solver.solve(operator, b, what=what)
    if not isinstance(result, SolveResult):
        raise UsageError(
            f"{what}: the solver's solve() must return a SolveResult, got {type(result).__name__}"
        )
    if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(result.solution).all())):
        # no finite hypergradient from non-finite numbers (a partial solve, a zero `w`)
        return [torch.full_like(t, math.nan) for t in inputs], result, stationarity
    w = operator.split(result.solution.to(b.dtype))
    live = [(residual[i], w[i]) for i in operator.live]
    if not live or not inputs:
        return [None] * len(inputs), result, stationarity
    cross = torch.autograd.grad(
        [r for r, _ in live], list(inputs), [v for _, v in live], allow_unused=True
    )
    return list(cross), result, stationarity


# ---- hypergrad ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Solution:
    """The solution's tensors, how the user's callables receive them, what to do before they
    run, and how to leave no trace after."""

    tensors: list[torch.Tensor]
    wrap: Callable[[list[torch.Tensor]], Any]
    prepare: Callable[[], None]
    restore: Callable[[], None]


def _nothing() -> None:
    return None


def _solution(params: Solution, what: str) -> _Solution:
    wrap: Callable[[list[torch.Tensor]], Any]
    prepare: Callable[[], None] = _nothing
    undo: Callable[[], None] = _nothing
    if isinstance(params, FunctionalModule):
        fmodel = params
        before = fmodel.fast_params
        tracking = fmodel.track_higher_grads

        def track() -> None:
            # Untracked, `fmodel(x, params=p)` would tie `p` to the model's own weights by a
            # straight-through link (first-order MAML): a gradient with respect to those
            # weights (iMAML's hyperparameters) would get a term that does not exist.
            fmodel.track_higher_grads = True

        def restore() -> None:
            # `fmodel(x, params=p)` in the losses makes `p` the current fast weights
            if any(a is not b for a, b in zip(fmodel.fast_params, before)):
                fmodel.fast_params = before
            fmodel.track_higher_grads = tracking

        tensors, wrap, prepare, undo = list(before), list, track, restore
    elif isinstance(params, torch.Tensor):
        tensors, wrap = [params], (lambda ts: ts[0])
    elif isinstance(params, Mapping):
        keys = list(params)
        tensors = list(params.values())

        def wrap(ts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            return dict(zip(keys, ts))
    elif isinstance(params, Sequence):
        tensors, wrap = list(params), list
    else:
        raise UsageError(
            f"{what}: params must be a Tensor, a sequence or mapping of Tensors, or a functional "
            f"model (higher.patch.FunctionalModule), got {type(params).__name__}"
        )
    if not tensors:
        raise ImplicitError(f"{what}: params is empty: expected the inner problem's solution")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"{what}: params[{i}] must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ImplicitError(f"{what}: params[{i}] has dtype {t.dtype}: expected floating point")
        first = tensors[0]
        if t.dtype != first.dtype or t.device != first.device:
            raise ImplicitError(
                f"{what}: params[{i}] is {t.dtype} on {t.device}, params[0] is {first.dtype} on "
                f"{first.device}: the solution's tensors must share one dtype and device"
            )
    return _Solution(tensors, wrap, prepare, undo)


def _hyper(hyper: Hyper, what: str) -> tuple[list[torch.Tensor], Any]:
    """The hyperparameters as a list, and as the user's callables receive them."""
    given: Any
    if isinstance(hyper, torch.Tensor):
        tensors, given = [hyper], hyper
    elif isinstance(hyper, Sequence):
        tensors = list(hyper)
        given = tensors
    else:
        raise UsageError(
            f"{what}: hyper must be a Tensor or a sequence of Tensors, got {type(hyper).__name__}"
        )
    if not tensors:
        raise ImplicitError(f"{what}: hyper is empty: expected the tensors to differentiate by")
    for i, h in enumerate(tensors):
        if not isinstance(h, torch.Tensor):
            raise UsageError(f"{what}: hyper[{i}] must be a Tensor, got {type(h).__name__}")
        if not h.requires_grad:
            raise ImplicitError(
                f"{what}: hyper[{i}] does not require grad: a hyperparameter to differentiate by "
                "must (call .requires_grad_() on it)"
            )
    return tensors, given


def _solver(solver: LinearSolver | type[LinearSolver] | None, what: str) -> LinearSolver:
    if solver is None:
        return CG()
    if isinstance(solver, type):  # `solver=CG`: the class with its defaults, as `CG()`
        name = solver.__name__
        try:
            solver = solver()
        except TypeError as err:
            raise UsageError(
                f"{what}: solver={name} is a class that cannot be made without arguments "
                f"({err}): pass an instance, e.g. solver={name}(...)"
            ) from err
    if not isinstance(solver, LinearSolver):
        raise UsageError(
            f"{what}: solver must be a linear solver (higher.implicit.CG(), Neumann(), Direct(), "
            f"or an object with solve(matvec, b, *, what)), got {type(solver).__name__}"
        )
    return solver


def _scalar(value: Any, name: str, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{what}: {name} must return a Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ImplicitError(
            f"{what}: {name} must return a scalar, got a tensor of shape {tuple(value.shape)}"
        )
    if not value.requires_grad:
        raise ImplicitError(
            f"{what}: {name} depends on neither params nor hyper (its result has no graph: "
            "computed under torch.no_grad(), or from detached tensors?)"
        )
    return value.reshape(())


def _check_callable(fn: object, name: str, what: str) -> None:
    if not callable(fn):
        raise UsageError(f"{what}: {name} must be callable, got {type(fn).__name__}")


def _check_tol(tol: float | None, what: str) -> None:
    if tol is None:
        return
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise UsageError(f"{what}: stationarity_tol must be a float or None, got "
                         f"{type(tol).__name__}")  # fmt: skip
    if not (tol > 0 and math.isfinite(tol)):
        raise ImplicitError(
            f"{what}: stationarity_tol must be a finite number > 0 (or None, no check), got {tol}"
        )


def _hypergrad_one(
    inner_loss: Loss,
    outer_loss: Loss,
    params: Solution,
    hyper: list[torch.Tensor],
    given: Any,
    solver: LinearSolver,
    stationarity_tol: float | None,
    what: str,
) -> tuple[list[torch.Tensor], SolveResult, Stationarity]:
    _check_callable(inner_loss, "inner_loss", what)
    _check_callable(outer_loss, "outer_loss", what)
    solution = _solution(params, what)
    leaves = [t.detach().requires_grad_() for t in solution.tensors]
    n = len(leaves)
    try:
        solution.prepare()
        with torch.enable_grad():
            inner = _scalar(inner_loss(solution.wrap(leaves), given), "inner_loss", what)
            residual = torch.autograd.grad(inner, leaves, create_graph=True, allow_unused=True)
            unused = [i for i, r in enumerate(residual) if r is None]
            if unused:
                raise ImplicitError(
                    f"{what}: inner_loss does not depend on params {unused}: the inner problem "
                    "does not determine them; pass only the weights it is solved for"
                )
            if not any(r.requires_grad for r in residual):
                raise ImplicitError(
                    f"{what}: inner_loss is linear in params (its gradient is constant): it has "
                    "no curvature, so no minimum to differentiate"
                )
            outer = _scalar(outer_loss(solution.wrap(leaves), given), "outer_loss", what)
            outer_grads = torch.autograd.grad(outer, [*leaves, *hyper], allow_unused=True)
    finally:
        solution.restore()
    cotangent = [g if g is not None else torch.zeros_like(t) for g, t in zip(outer_grads, leaves)]
    point = "params is not a stationary point of inner_loss (F = its gradient)"
    cross, result, stationarity = _implicit_vjp(
        residual, leaves, hyper, cotangent, solver, what, (stationarity_tol, point)
    )
    grads = []
    for h, direct, c in zip(hyper, outer_grads[n:], cross):
        g = direct.detach().clone() if direct is not None else torch.zeros_like(h)
        grads.append(g - c if c is not None else g)
    return grads, result, stationarity


def hypergrad(
    inner_loss: Loss,
    outer_loss: Loss,
    params: Solution,
    hyper: Hyper,
    *,
    solver: LinearSolver | type[LinearSolver] | None = None,
    stationarity_tol: float | None = STATIONARITY_TOL,
) -> Hypergrad:
    """The gradient of `outer_loss` at the inner problem's solution `params` with respect to
    `hyper`, by the implicit function theorem: no unroll, whatever found the solution.

    `params` must (nearly) minimize `inner_loss(params, hyper)` over `params` — solved with
    `diffopt` steps inside `innerloop_ctx`, a torch optimizer, a closed form, anything. Then
    `dθ*/dλ = -H⁻¹ ∂²f/∂θ∂λ` (`H = ∂²f/∂θ²`), so

        d outer/d hyper = ∂outer/∂hyper - (∂²f/∂θ∂hyper)ᵀ H⁻¹ ∇_θ outer,

    with `H⁻¹ ∇_θ outer` solved by `solver` (default `CG()`) from Hessian-vector products
    (double backward), and the rest two vector-Jacobian products. The answer is exact to the
    solve's tolerance *at* `params`; its error grows with how far `params` is from a stationary
    point, so that distance is estimated (`Stationarity`, one more product) and a point farther
    than `stationarity_tol · max(|params|, 1)` warns with `NotStationaryWarning` (raises
    `NotStationaryError` with the solver's `on_fail="raise"`). A solve that does not converge
    warns or raises likewise (`ConvergenceWarning`/`ConvergenceError`). NaN or inf in the losses,
    `params` or `hyper` give a hypergradient of NaN in every entry (and the solve's report),
    never a finite one.

    Hyperparameters are any tensors that require grad and that the losses read: a penalty,
    a value passed to `innerloop_ctx`'s `override` (the same tensor), the data (per-example
    weights, the training inputs), or — iMAML — the meta-initialization through a proximal term
    `λ/2 |θ - θ₀|²` in `inner_loss`.

    Args:
        inner_loss: `inner_loss(params, hyper) -> scalar`, the objective `params` minimizes.
        outer_loss: `outer_loss(params, hyper) -> scalar`, e.g. a validation loss.
        params: the solution: a Tensor, a sequence of Tensors, a mapping name -> Tensor
            (`fmodel.named_fast_params()`), or a functional model (its current fast weights;
            `fmodel.fast_params`). The losses receive them as given (a functional model's as a
            list, in the order of `fmodel.parameters()`, so `fmodel(x, params=params)` runs
            it, with the model tracking so that no straight-through link to its own weights
            enters; its current weights and tracking flag are put back afterwards). They are
            detached: nothing flows through how they were found.
        hyper: a Tensor or a sequence of Tensors, each requiring grad; the losses receive it as
            given.
        solver: `CG()` (default; needs `H` positive definite), `Neumann(alpha)`, `Direct()`
            (small problems, any nonsingular `H`), or your own `LinearSolver`; a class
            (`solver=CG`) is made with its defaults.
        stationarity_tol: how far from a stationary point `params` may be, relative to
            `max(|params|, 1)` (default 1e-3); None turns the check off.

    Returns:
        `Hypergrad(grads, solves, stationarity)`: one gradient per hyperparameter (never
        accumulated into `.grad`), the `SolveResult` of the solve, and the `Stationarity` of
        `params` (`stationarity[0].grad_norm` is `|∇_θ inner_loss|` there).

    Examples:
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> theta = torch.tensor(0.5)  # argmin of (θ - 1)²/2 + λθ²/2 at λ = 1: 1 / (1 + λ)
        >>> inner = lambda theta, lam: (theta - 1) ** 2 / 2 + lam * theta**2 / 2
        >>> higher.implicit.hypergrad(inner, lambda theta, lam: theta, theta, lam).grads
        [tensor(-0.2500)]
    """
    what = "hypergrad"
    _check_tol(stationarity_tol, what)
    tensors, given = _hyper(hyper, what)
    chosen = _solver(solver, what)
    grads, result, stationarity = _hypergrad_one(
        inner_loss, outer_loss, params, tensors, given, chosen, stationarity_tol, what
    )
    return Hypergrad(grads, [result], [stationarity])


def hypergrad_batch(
    tasks: Iterable[Task | tuple[Loss, Loss, Solution]],
    hyper: Hyper,
    *,
    solver: LinearSolver | type[LinearSolver] | None = None,
    reduction: Reduction = "mean",
    stationarity_tol: float | None = STATIONARITY_TOL,
) -> Hypergrad:
    """The hypergradient of a batch of inner problems that share `hyper`: the mean (or sum) of
    each task's `hypergrad`, each task solved on its own (its own `SolveResult`).

    Each task is a `Task(inner_loss, outer_loss, params)` (or such a tuple): its losses and
    its solution, as for `hypergrad`. Only one task's graph is alive at a time. (Tasks written
    as one batched loss over stacked weights — one `vmap`-style inner loss whose Hessian is
    block diagonal — give the same sum through a single `hypergrad` call and one joint solve.)

    Args:
        tasks: the inner problems.
        hyper: the shared hyperparameters (a Tensor or a sequence of Tensors, requiring grad).
        solver: as for `hypergrad` (default `CG()`).
        reduction: "mean" (default) or "sum" over the tasks.
        stationarity_tol: as for `hypergrad`, checked for each task's solution.

    Returns:
        `Hypergrad(grads, solves, stationarity)` with one `SolveResult` and one
        `Stationarity` per task.

    Examples:
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> inner = lambda theta, lam: (theta - 1) ** 2 / 2 + lam * theta**2 / 2
        >>> tasks = [(inner, lambda t, lam: t, torch.tensor(0.5)),
        ...          (inner, lambda t, lam: 3 * t, torch.tensor(0.5))]
        >>> higher.implicit.hypergrad_batch(tasks, lam).grads
        [tensor(-0.5000)]
    """
    what = "hypergrad_batch"
    if reduction not in ("mean", "sum"):
        raise ImplicitError(f"{what}: reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_tol(stationarity_tol, what)
    tensors, given = _hyper(hyper, what)
    chosen = _solver(solver, what)
    if isinstance(tasks, (torch.Tensor, str)) or not isinstance(tasks, Iterable):
        raise UsageError(f"{what}: tasks must be an iterable of Task, got {type(tasks).__name__}")
    total: list[torch.Tensor] | None = None
    solves: list[SolveResult] = []
    checks: list[Stationarity] = []
    for k, task in enumerate(tasks):
        if not (isinstance(task, tuple) and len(task) == 3):
            raise UsageError(
                f"{what}: tasks[{k}] must be a Task(inner_loss, outer_loss, params), got "
                f"{type(task).__name__}"
            )
        inner_loss, outer_loss, params = task
        grads, result, stationarity = _hypergrad_one(
            inner_loss, outer_loss, params, tensors, given, chosen, stationarity_tol,
            f"{what} (task {k})",
        )  # fmt: skip
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
        solves.append(result)
        checks.append(stationarity)
    if total is None:
        raise ImplicitError(f"{what}: tasks is empty: expected at least one inner problem")
    if reduction == "mean":
        total = [t / len(solves) for t in total]
    return Hypergrad(total, solves, checks)


# ---- custom_root -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where the `index`-th differentiable tensor sat in the solver's arguments."""

    index: int


def _template(tree: Any, inputs: list[torch.Tensor], seen: dict[int, int]) -> Any:
    """`tree` with every tensor that requires grad replaced by a `_Slot` (collected in
    `inputs`; one slot per distinct tensor)."""

    def slot(x: Any) -> Any:
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            return x
        if id(x) not in seen:
            seen[id(x)] = len(inputs)
            inputs.append(x)
        return _Slot(seen[id(x)])

    return map_leaves(slot, tree)


def _rebuild(tree: Any, leaves: Sequence[torch.Tensor]) -> Any:
    return map_leaves(lambda x: leaves[x.index] if isinstance(x, _Slot) else x, tree)


def _outputs(out: Any, what: str) -> tuple[list[torch.Tensor], Callable[[Sequence[Any]], Any]]:
    """The solver's output as a list of tensors, and how to give it back in its own form."""
    if isinstance(out, torch.Tensor):
        return [out], lambda ts: ts[0]
    if isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
        kind = type(out)
        if hasattr(out, "_fields"):
            return list(out), lambda ts: kind(*ts)
        return list(out), lambda ts: kind(ts)
    raise UsageError(
        f"{what}: the solver must return a Tensor or a non-empty list/tuple of Tensors, got "
        f"{type(out).__name__}"
    )


def _declared(init: Any) -> list[torch.Tensor] | None:
    """The initial solution's tensors, when it is a Tensor or a list/tuple of them."""
    if isinstance(init, torch.Tensor):
        return [init]
    if isinstance(init, (list, tuple)) and init and all(isinstance(t, torch.Tensor) for t in init):
        return list(init)
    return None


def _describe(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}".replace("torch.", "") for t in tensors)


def _check_like_init(init: Any, out: Sequence[torch.Tensor], what: str) -> None:
    """The solver's output must be shaped as its initial solution (when that is tensors): a
    solver that takes the solution's parts as separate arguments would otherwise hand
    `optimality_fn` arguments in the wrong places, and fail inside the user's code."""
    declared = _declared(init)
    if declared is None:
        return
    same = len(declared) == len(out) and all(
        d.shape == o.shape and d.dtype == o.dtype for d, o in zip(declared, out)
    )
    if not same:
        raise ImplicitError(
            f"{what}: the solver returned {len(out)} tensor(s) [{_describe(out)}] for an initial "
            f"solution (its first argument) of {len(declared)} [{_describe(declared)}]: they "
            "must match in number, shape and dtype. The solver is called solver_fn(init, *args, "
            "**kwargs) and optimality_fn(solution, *args, **kwargs): the first argument is the "
            "whole solution, so a solution of several tensors is passed as one tuple, "
            "fit((w0, b0), lam), not fit(w0, b0, lam)"
        )


def _residual(value: Any, solution: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    parts = [value] if isinstance(value, torch.Tensor) else value
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in parts):
        raise UsageError(
            f"{what}: optimality_fn must return a Tensor or a list/tuple of Tensors shaped as "
            f"the solution, got {type(value).__name__}"
        )
    if len(parts) != len(solution):
        raise ImplicitError(
            f"{what}: optimality_fn returned {len(parts)} tensor(s) for a solution of "
            f"{len(solution)}: it must return one residual per solution tensor"
        )
    for i, (p, s) in enumerate(zip(parts, solution)):
        if p.shape != s.shape:
            raise ImplicitError(
                f"{what}: optimality_fn's output [{i}] has shape {tuple(p.shape)}, the solution's "
                f"{tuple(s.shape)}: the residual must be shaped as the solution"
            )
    if not any(p.requires_grad for p in parts):
        raise ImplicitError(
            f"{what}: optimality_fn's output does not depend on the solution (a gradient taken "
            "without create_graph=True?)"
        )
    return list(parts)


@dataclasses.dataclass(frozen=True)
class _RootSpec:
    optimality_fn: Callable[..., Any]
    solver: LinearSolver
    #: the solver's arguments after the first, with `_Slot`s for the differentiable tensors
    template: tuple[tuple[Any, ...], dict[str, Any]]
    wrap: Callable[[Sequence[Any]], Any]
    n: int
    stationarity_tol: float | None
    what: str


class _Root(torch.autograd.Function):
    """Identity on the solution in the forward; the implicit function theorem in the backward."""

    @staticmethod
    def forward(ctx: Any, spec: _RootSpec, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        return tuple(t.clone() for t in tensors[: spec.n])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *cotangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        spec: _RootSpec = ctx.spec
        saved = ctx.saved_tensors
        solution = [t.detach().requires_grad_() for t in saved[: spec.n]]
        inputs = [t.detach().requires_grad_() for t in saved[spec.n :]]
        with torch.enable_grad():
            args, kwargs = _rebuild(spec.template, inputs)
            value = spec.optimality_fn(spec.wrap(solution), *args, **kwargs)
            residual = _residual(value, solution, spec.what)
        cotangent = [c if c is not None else torch.zeros_like(s) for c, s in zip(cotangents, saved)]
        point = "the solver's output is not a root of optimality_fn (F)"
        cross, _, _ = _implicit_vjp(
            residual, solution, inputs, cotangent, spec.solver, spec.what,
            (spec.stationarity_tol, point),
        )  # fmt: skip
        grads = [-c if c is not None else None for c in cross]
        return (None, *([None] * spec.n), *grads)


def custom_root(
    optimality_fn: Callable[..., Any],
    *,
    solver: LinearSolver | type[LinearSolver] | None = None,
    stationarity_tol: float | None = STATIONARITY_TOL,
) -> Callable[[SolverFn], SolverFn]:
    """Decorate a solver so that its output is differentiable through its optimality condition.

    `solver_fn(init, *args, **kwargs)` returns a solution `x*` (a Tensor, or a list/tuple of
    Tensors) with `optimality_fn(x*, *args, **kwargs) == 0` (a residual shaped as `x*`; for a
    minimum, the gradient of the objective, taken with `create_graph=True`). The decorated
    function returns `x*` (detached from how the solver found it) such that `backward()` or
    `torch.autograd.grad` of anything computed from it reaches every tensor in `args`/`kwargs`
    (also inside lists, tuples and dicts) that requires grad, by the implicit function theorem:
    `(∂F/∂x)ᵀ w = v` is solved by `solver` (default `CG()`, which needs `∂F/∂x` symmetric
    positive definite — the Hessian at a strict minimum; use `Direct()` for any other
    nonsingular condition), and the gradient is `-(∂F/∂args)ᵀ w`. `init` gets no gradient (at
    a solution, where the solver started does not matter). When `init` is a Tensor or a
    list/tuple of Tensors, the solver's output must match it in number, shape and dtype (an
    `ImplicitError` says what differs). As in TorchOpt and JAXopt, with three differences: the
    tensors that require grad are the ones differentiated (no `argnums`); a non-converged solve
    warns or raises (the solver's `on_fail`) instead of passing silently; and in the backward
    the output's distance to a root of `optimality_fn` is estimated (`Stationarity`) and one
    farther than `stationarity_tol · max(|x*|, 1)` warns with `NotStationaryWarning` (raises
    `NotStationaryError` with `on_fail="raise"`). NaN or inf give NaN gradients. The backward
    is differentiable once (no gradient of the gradient).

    Args:
        optimality_fn: `optimality_fn(solution, *args, **kwargs) -> residual`.
        solver: the linear solver of the backward pass (default `CG()`; a class is made with
            its defaults).
        stationarity_tol: how far from a root the solver's output may be, relative to
            `max(|x*|, 1)` (default 1e-3); None turns the check off.

    Returns:
        A decorator: `custom_root(optimality_fn)(solver_fn)`.

    Examples:
        >>> def optimality(theta, lam):  # the gradient of (θ - 1)²/2 + λθ²/2
        ...     return theta - 1 + lam * theta
        >>> @higher.implicit.custom_root(optimality)
        ... def argmin(theta, lam):
        ...     return 1 / (1 + lam)  # any solver: here the closed form
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> argmin(torch.tensor(0.0), lam).backward()
        >>> lam.grad
        tensor(-0.2500)
    """
    what = "custom_root"
    _check_callable(optimality_fn, "optimality_fn", what)
    _check_tol(stationarity_tol, what)
    chosen = _solver(solver, what)

    def decorate(solver_fn: SolverFn) -> SolverFn:
        _check_callable(solver_fn, "the decorated solver", what)
        name = getattr(solver_fn, "__qualname__", type(solver_fn).__name__)
        where = f"custom_root({name})"

        @functools.wraps(solver_fn)
        def solve(*args: Any, **kwargs: Any) -> Any:
            if not args:
                raise UsageError(
                    f"{where}: the solver takes the initial solution as its first argument"
                )
            tensors, wrap = _outputs(solver_fn(*args, **kwargs), where)
            _check_like_init(args[0], tensors, where)
            inputs: list[torch.Tensor] = []
            template = _template((args[1:], kwargs), inputs, {})
            solution = [t.detach() for t in tensors]
            if not inputs or not torch.is_grad_enabled():
                return wrap(solution)
            spec = _RootSpec(
                optimality_fn, chosen, template, wrap, len(solution), stationarity_tol, where
            )
            return wrap(_Root.apply(spec, *solution, *inputs))  # type: ignore[no-untyped-call]

        return solve  # type: ignore[return-value]

    return decorate
