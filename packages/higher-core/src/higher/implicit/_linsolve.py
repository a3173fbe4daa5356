"""Linear solvers for implicit differentiation: conjugate gradient, Neumann series, dense solve.

Each solves `A x = b` for a vector `b` and a linear map `A` known only through `matvec(v) = A v`
(in `higher.implicit`, one Hessian-vector product by double backward). Each stops at a tolerance
or an iteration budget, reports how far it got in a `SolveResult` (the residual `|b - A x|` is
always measured with one more product, never taken from the recurrence), and never hands back a
non-converged answer silently: `on_fail="warn"` (the default) warns with a `ConvergenceWarning`,
`on_fail="raise"` raises a `ConvergenceError`; both carry the result. A solve that meets NaN or inf
(in `b` or in a product) returns a solution of NaN: never a finite number computed from
non-finite ones.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch

from higher._errors import ImplicitError, UsageError
from higher.errors import HigherError, HigherWarning

Matvec = Callable[[torch.Tensor], torch.Tensor]
OnFail = Literal["warn", "raise"]

#: Neumann/Richardson iterations stop as diverged once the residual exceeds this many |b|.
_DIVERGED = 10.0
#: Columns of the dense matrix built per batched product (bounds the memory of one batch).
_CHUNK = 256

_ADVICE = {
    "maxiter": "raise maxiter, loosen tol, or regularize the inner problem (a larger L2 or "
    "proximal term makes the system better conditioned)",
    "negative curvature": "the matrix is not positive definite (p·Ap <= 0): the point is not a "
    "strict local minimum of the inner objective, or the objective is not convex there; solve "
    "the inner problem further, add an L2 or proximal term, or use Direct(), which needs only "
    "a nonsingular matrix",
    "diverged": "the series diverges: it needs 0 < alpha < 2 / lambda_max(A) and A positive "
    "definite; lower alpha or use CG()",
    "singular": "the matrix is singular: the inner problem does not determine its solution "
    "uniquely (add an L2 or proximal term)",
    "stalled": "the recurrence reached the tolerance but the true residual did not: round-off "
    "at this precision and conditioning (use float64, or loosen tol)",
    "not finite": "a product A·v gave NaN or inf (the Hessian at the solution is not finite: "
    "check the solution and the hyperparameters for NaN or inf); the solution is NaN",
    "not finite b": "b has NaN or inf entries (for a hypergradient: the outer loss's gradient "
    "at the solution is not finite: check the outer loss and the solution for NaN or inf); the "
    "solution is NaN",
}


class SolveResult(NamedTuple):
    """What a linear solve returned and how far it got.

    Examples:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> result = higher.implicit.CG(tol=1e-12).solve(lambda v: A @ v, torch.ones(2).double())
        >>> result.solution.tolist(), result.converged, result.iterations, result.status
        ([0.5, 0.25], True, 2, 'converged')
    """

    #: the approximate solution `x` (a flat vector)
    solution: torch.Tensor
    #: whether `residual <= threshold`
    converged: bool
    #: "converged", or why it stopped: "maxiter", "negative curvature", "diverged",
    #: "singular", "stalled", "not finite"
    status: str
    #: iterations of the method (CG or Neumann steps; refinement steps of Direct)
    iterations: int
    #: products `A v` evaluated in all (the cost: one Hessian-vector product each)
    matvecs: int
    #: `|b - A x|` (2-norm) of `solution`, measured with one product `A x`
    residual: float
    #: the residual it had to reach: `max(tol * |b|, atol)`
    threshold: float
    #: `|b|`
    rhs_norm: float
    #: "cg", "neumann" or "direct"
    method: str

    @property
    def relative_residual(self) -> float:
        """`residual / |b|` (0 when `b` is 0)."""
        return self.residual / self.rhs_norm if self.rhs_norm > 0 else 0.0


class ConvergenceError(HigherError, RuntimeError):
    """A linear solve of `higher.implicit` did not reach its tolerance, with `on_fail="raise"`
    (also a `RuntimeError`). `result` is the `SolveResult`: the status, iterations, residual.

    Examples:
        >>> A = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)  # indefinite
        >>> try:
        ...     higher.implicit.CG(on_fail="raise").solve(lambda v: A @ v, torch.ones(2).double())
        ... except higher.implicit.ConvergenceError as err:
        ...     print(err.result.status)
        negative curvature
    """

    __module__ = "higher.implicit"  # its public path, for tracebacks, pickle and the docs

    def __init__(self, message: str, result: SolveResult) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type, tuple[str, SolveResult]]:  # pickles with its result
        return type(self), (str(self), self.result)


class ConvergenceWarning(HigherWarning):
    """A linear solve of `higher.implicit` did not reach its tolerance (`on_fail="warn"`, the
    default): the answer is used, and `result` says how far it got.

    Examples:
        >>> import warnings
        >>> A = torch.tensor([[1.0, 0.0], [0.0, 100.0]], dtype=torch.float64)
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     solver = higher.implicit.Neumann(maxiter=3)
        ...     _ = solver.solve(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> seen[0].message.result.status
        'diverged'
    """

    __module__ = "higher.implicit"  # its public path, for tracebacks, pickle and the docs

    def __init__(self, message: str, result: SolveResult) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type, tuple[str, SolveResult]]:  # pickles with its result
        return type(self), (str(self), self.result)


@runtime_checkable
class LinearSolver(Protocol):
    """A solver of `A x = b` given `matvec(v) = A v`: `CG`, `Neumann`, `Direct`, or your own.

    `solve` returns a `SolveResult` and reports a failure itself (warns or raises, by the
    solver's `on_fail`); `what` names the computation in that report.

    Examples:
        >>> isinstance(higher.implicit.CG(), higher.implicit.LinearSolver)
        True
    """

    def solve(self, matvec: Matvec, b: torch.Tensor, *, what: str = "linear solve") -> SolveResult:
        """Solve `A x = b` for the flat vector `b`."""
        ...


def _check_common(solver: object, tol: float, atol: float, on_fail: str) -> None:
    name = type(solver).__name__
    for field, value in (("tol", tol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{name}: {field} must be a float, got {type(value).__name__}")
        if not (value >= 0 and math.isfinite(value)):
            raise ImplicitError(f"{name}: {field} must be a finite number >= 0, got {value}")
    if on_fail not in ("warn", "raise"):
        raise ImplicitError(f"{name}: on_fail must be 'warn' or 'raise', got {on_fail!r}")


def _check_int(solver: object, field: str, value: int, least: int) -> None:
    name = type(solver).__name__
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name}: {field} must be an int, got {type(value).__name__}")
    if value < least:
        raise ImplicitError(f"{name}: {field} must be >= {least}, got {value}")


def _check_rhs(solver: object, b: torch.Tensor) -> None:
    if not isinstance(b, torch.Tensor):
        raise UsageError(
            f"{type(solver).__name__}.solve: b must be a Tensor, got {type(b).__name__}"
        )
    if b.dim() != 1 or not b.is_floating_point():
        raise ImplicitError(
            f"{type(solver).__name__}.solve: b must be a 1-D floating-point tensor, got shape "
            f"{tuple(b.shape)} and dtype {b.dtype}"
        )


def _norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v))


def _finish(
    solver: CG | Neumann | Direct,
    what: str,
    x: torch.Tensor,
    status: str,
    iterations: int,
    matvecs: int,
    residual: float,
    threshold: float,
    rhs_norm: float,
) -> SolveResult:
    """The result, reported (warned or raised) when it did not converge."""
    if not math.isfinite(residual) and status in ("converged", "maxiter", "stalled", "singular"):
        status = "not finite"
    converged = math.isfinite(residual) and residual <= threshold
    if converged:
        status = "converged"
    elif status == "converged":
        status = "stalled"
    if status == "not finite":  # no finite answer from non-finite numbers
        x, residual = torch.full_like(x, math.nan), math.nan
    result = SolveResult(
        x, converged, status, iterations, matvecs, residual, threshold, rhs_norm, solver.method
    )
    if not converged:
        advice = _ADVICE["not finite b" if not math.isfinite(rhs_norm) else status]
        message = (
            f"{what}: {solver.method} did not converge ({status}) after {iterations} "
            f"iteration(s): residual |b - Ax| = {residual:.3e} > {threshold:.3e} "
            f"(tol·|b| = {solver.tol:g}·{rhs_norm:.3e}); {advice}"
        )
        if solver.on_fail == "raise":
            raise ConvergenceError(message, result)
        warnings.warn(ConvergenceWarning(message, result), stacklevel=3)
    return result


@dataclasses.dataclass(frozen=True)
class CG:
    """Conjugate gradient for a symmetric positive definite `A` (a Hessian at a strict minimum).

    Stops when `|b - A x| <= max(tol * |b|, atol)` or after `maxiter` iterations (one product
    each, plus one to measure the final residual). On a matrix that is not positive definite
    (the inner objective is not convex at the point, or the point is a saddle) CG has no
    meaning: when it meets a direction of non-positive curvature (`p·Ap <= 0`) it stops and
    reports `status="negative curvature"`. On a non-symmetric `A` CG may stall or wander, but
    whatever it reports as converged does solve `A x = b` (the residual is measured, not
    assumed). A failure warns (`on_fail="warn"`, the default) or raises (`"raise"`).

    Examples:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = A @ torch.ones(2, dtype=torch.float64)
        >>> result = higher.implicit.CG(tol=1e-12).solve(lambda v: A @ v, b)
        >>> [round(v, 12) for v in result.solution.tolist()], result.matvecs
        ([1.0, 1.0], 3)
    """

    tol: float = 1e-6
    atol: float = 0.0
    maxiter: int = 100
    on_fail: OnFail = "warn"

    method = "cg"

    def __post_init__(self) -> None:
        _check_common(self, self.tol, self.atol, self.on_fail)
        _check_int(self, "maxiter", self.maxiter, 1)

    def solve(self, matvec: Matvec, b: torch.Tensor, *, what: str = "linear solve") -> SolveResult:
        """Solve `A x = b` from `x = 0`; see the class docstring."""
        _check_rhs(self, b)
        rhs_norm = _norm(b)
        threshold = max(self.tol * rhs_norm, self.atol)
        x = torch.zeros_like(b)
        if rhs_norm <= threshold or not math.isfinite(rhs_norm):
            return _finish(self, what, x, "converged", 0, 0, rhs_norm, threshold, rhs_norm)
        r = b.clone()
        p = r.clone()
        rr = torch.dot(r, r)
        status, iterations, matvecs = "maxiter", 0, 0
        for _ in range(self.maxiter):
            ap = matvec(p)
            matvecs += 1
            curvature = torch.dot(p, ap)
            if not bool(torch.isfinite(curvature)):
                status = "not finite"
                break
            if curvature <= 0:
                status = "negative curvature"
                break
            alpha = rr / curvature
            x.add_(alpha * p)
            r.sub_(alpha * ap)
            iterations += 1
            rr_next = torch.dot(r, r)
            if math.sqrt(float(rr_next)) <= threshold:
                status = "converged"
                break
            p = r + (rr_next / rr) * p
            rr = rr_next
        residual = _norm(b - matvec(x))
        return _finish(
            self, what, x, status, iterations, matvecs + 1, residual, threshold, rhs_norm
        )


@dataclasses.dataclass(frozen=True)
class Neumann:
    """The Neumann series `A⁻¹ b ≈ alpha · Σₖ (I - alpha A)ᵏ b` (Richardson's iteration).

    Each iteration adds one term: `x ← x + alpha (b - A x)`, one product. The series converges
    when every eigenvalue of `I - alpha A` lies inside the unit circle: for a symmetric `A`, when
    `A` is positive definite and `0 < alpha < 2 / lambda_max(A)` (`alpha = 1 / lambda_max`
    is safe; the error then shrinks by `1 - lambda_min / lambda_max` per term, so an
    ill-conditioned `A` needs many terms: CG needs about the square root as many). It stops
    when `|b - A x| <= max(tol * |b|, atol)`, after `maxiter` terms (`status="maxiter"`), or as
    soon as the residual exceeds 10 |b| (`status="diverged"`: `alpha` too large, or `A` not
    positive definite). A truncated series is an approximation some methods use on purpose; it
    is still reported (filter `ConvergenceWarning` to silence it). A failure warns
    (`on_fail="warn"`, the default) or raises (`"raise"`).

    Examples:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> result = higher.implicit.Neumann(alpha=0.5, tol=1e-10, maxiter=200).solve(
        ...     lambda v: A @ v, torch.ones(2).double())
        >>> [round(v, 8) for v in result.solution.tolist()], result.iterations
        ([0.5, 1.0], 33)
    """

    alpha: float = 1.0
    tol: float = 1e-6
    atol: float = 0.0
    maxiter: int = 100
    on_fail: OnFail = "warn"

    method = "neumann"

    def __post_init__(self) -> None:
        _check_common(self, self.tol, self.atol, self.on_fail)
        _check_int(self, "maxiter", self.maxiter, 1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise UsageError(f"Neumann: alpha must be a float, got {type(self.alpha).__name__}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ImplicitError(f"Neumann: alpha must be a finite number > 0, got {self.alpha}")

    def solve(self, matvec: Matvec, b: torch.Tensor, *, what: str = "linear solve") -> SolveResult:
        """Sum the series from `x = 0`; see the class docstring."""
        _check_rhs(self, b)
        rhs_norm = _norm(b)
        threshold = max(self.tol * rhs_norm, self.atol)
        x = torch.zeros_like(b)
        r = b
        residual = rhs_norm
        status, iterations = "maxiter", 0
        while residual > threshold and iterations < self.maxiter:
            x = x + self.alpha * r
            r = b - matvec(x)
            iterations += 1
            residual = _norm(r)
            if not math.isfinite(residual):
                status = "not finite"
                break
            if residual > _DIVERGED * rhs_norm:
                status = "diverged"
                break
        return _finish(self, what, x, status, iterations, iterations, residual, threshold, rhs_norm)


@dataclasses.dataclass(frozen=True)
class Direct:
    """A dense solve for small problems: `A` is built column by column, then LU-factored.

    Building `A` costs `n` products (`n` unknowns), batched through autograd where it can be
    (`is_grads_batched`), and `n²` numbers of memory: `Direct` refuses `n > max_size`. It needs
    only a nonsingular `A` (any sign of curvature, any symmetry); a singular one is reported
    (`status="singular"`). After the solve, up to `maxiter` steps of iterative refinement
    (`x ← x + A⁻¹(b - A x)`, the residual measured with a true product) bring the residual to
    `max(tol * |b|, atol)` where round-off allows. A failure warns (`on_fail="warn"`, the
    default) or raises (`"raise"`).

    Examples:
        >>> A = torch.tensor([[0.0, 1.0], [-2.0, 0.0]], dtype=torch.float64)  # not symmetric
        >>> result = higher.implicit.Direct().solve(lambda v: A @ v, torch.ones(2).double())
        >>> result.solution.tolist(), result.matvecs
        ([-0.5, 1.0], 3)
    """

    tol: float = 1e-6
    atol: float = 0.0
    maxiter: int = 2
    max_size: int = 10_000
    on_fail: OnFail = "warn"

    method = "direct"

    def __post_init__(self) -> None:
        _check_common(self, self.tol, self.atol, self.on_fail)
        _check_int(self, "maxiter", self.maxiter, 0)
        _check_int(self, "max_size", self.max_size, 1)

    def solve(self, matvec: Matvec, b: torch.Tensor, *, what: str = "linear solve") -> SolveResult:
        """Build `A`, LU-factor it, solve and refine; see the class docstring."""
        _check_rhs(self, b)
        n = b.numel()
        if n > self.max_size:
            raise ImplicitError(
                f"{what}: Direct would build a dense {n}×{n} matrix, above max_size="
                f"{self.max_size}; use CG() (or raise max_size if {n}² numbers fit in memory)"
            )
        rhs_norm = _norm(b)
        threshold = max(self.tol * rhs_norm, self.atol)
        x = torch.zeros_like(b)
        if rhs_norm <= threshold or not math.isfinite(rhs_norm):
            return _finish(self, what, x, "converged", 0, 0, rhs_norm, threshold, rhs_norm)
        matrix = _dense(matvec, n, b)
        if not bool(torch.isfinite(matrix).all()):
            return _finish(self, what, x, "not finite", 0, n, math.nan, threshold, rhs_norm)
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        if int(info) != 0 or not bool(torch.isfinite(lu).all()):
            return _finish(self, what, x, "singular", 0, n, rhs_norm, threshold, rhs_norm)
        x = torch.linalg.lu_solve(lu, pivots, b.unsqueeze(1)).squeeze(1)
        matvecs, iterations = n, 0
        while True:
            r = b - matvec(x)
            matvecs += 1
            residual = _norm(r)
            if residual <= threshold or iterations == self.maxiter or not math.isfinite(residual):
                break
            x = x + torch.linalg.lu_solve(lu, pivots, r.unsqueeze(1)).squeeze(1)
            iterations += 1
        status = "converged" if residual <= threshold else "maxiter"
        return _finish(self, what, x, status, iterations, matvecs, residual, threshold, rhs_norm)


def _dense(matvec: Matvec, n: int, like: torch.Tensor) -> torch.Tensor:
    """The matrix of `matvec` (`n` products): batched when `matvec` offers `matmat`."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    matmat: Callable[[torch.Tensor], torch.Tensor] | None = getattr(matvec, "matmat", None)
    if matmat is not None:
        rows = [matmat(eye[i : i + _CHUNK]) for i in range(0, n, _CHUNK)]
    else:
        rows = [matvec(eye[i]).unsqueeze(0) for i in range(n)]
    # row i holds A e_i, the i-th column of A
    return torch.cat(rows).T.contiguous()
