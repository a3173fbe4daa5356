"""The linear solvers of higher.implicit (CG, Neumann, Direct) against torch.linalg.solve, in
float64: solutions, the reported residual (measured independently here), and every way a solve
can fail, each warned or raised as documented."""

from __future__ import annotations

import doctest
import importlib
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch

import higher
from higher.implicit import (
    CG,
    ConvergenceError,
    ConvergenceWarning,
    Direct,
    ImplicitError,
    LinearSolver,
    Neumann,
    SolveResult,
)

DT = torch.float64


def spd(n: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with eigenvalues spread evenly over [low, high]."""
    g = torch.Generator().manual_seed(seed)
    q: torch.Tensor = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    return q @ torch.diag(torch.linspace(low, high, n, dtype=DT)) @ q.T


def rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def product(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda v: a @ v


def true_residual(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(b - a @ x))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize(
    "solver",
    [CG(tol=1e-12), Neumann(alpha=1 / 10, tol=1e-12, maxiter=1000), Direct(tol=1e-12)],
    ids=["cg", "neumann", "direct"],
)
def test_spd_solution_and_reported_residual(solver: LinearSolver) -> None:
    a, b = spd(40, 1.0, 10.0), rhs(40)
    result = solver.solve(product(a), b)
    assert isinstance(result, SolveResult)
    assert rel_err(result.solution, torch.linalg.solve(a, b)) < 1e-10
    assert result.converged and result.status == "converged"
    assert result.residual == pytest.approx(true_residual(a, b, result.solution), rel=1e-6)
    assert result.residual <= result.threshold == pytest.approx(1e-12 * float(b.norm()))
    assert result.rhs_norm == pytest.approx(float(b.norm()))
    assert result.relative_residual <= 1e-12


def test_cg_costs_and_counts() -> None:
    a, b = spd(40, 1.0, 10.0), rhs(40)
    calls = []

    def counted(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ v

    result = CG(tol=1e-12).solve(counted, b)
    # 40 distinct eigenvalues: exact arithmetic needs at most 40 iterations; this spectrum far
    # fewer. One more product measures the final residual.
    assert 5 < result.iterations < 40
    assert result.matvecs == result.iterations + 1 == len(calls)
    assert result.method == "cg"


def test_direct_on_a_nonsymmetric_matrix_counts_n_products_plus_the_check() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(12, 12, generator=g, dtype=DT) + 6 * torch.eye(12, dtype=DT)
    b = rhs(12)
    result = Direct(tol=1e-13).solve(product(a), b)
    assert rel_err(result.solution, torch.linalg.solve(a, b)) < 1e-12
    assert result.converged and result.matvecs == 12 + 1 and result.iterations == 0


def test_zero_rhs_needs_no_product() -> None:
    for solver in (CG(), Neumann(), Direct()):
        zero = torch.zeros(3, dtype=DT)
        result = solver.solve(lambda v: pytest.fail("no product expected"), zero)
        assert result.converged and result.matvecs == 0
        assert torch.equal(result.solution, torch.zeros(3, dtype=DT))


def test_cg_maxiter_warns_by_default_and_the_answer_comes_with_the_result() -> None:
    a, b = spd(40, 1e-3, 10.0), rhs(40)
    with pytest.warns(ConvergenceWarning, match=r"linear solve: cg did not converge \(maxiter\)"):
        result = CG(tol=1e-12, maxiter=3).solve(product(a), b)
    assert not result.converged and result.status == "maxiter" and result.iterations == 3
    assert result.residual == pytest.approx(true_residual(a, b, result.solution), rel=1e-9)
    assert result.residual > result.threshold


def test_cg_maxiter_raises_on_request() -> None:
    a, b = spd(40, 1e-3, 10.0), rhs(40)
    with pytest.raises(ConvergenceError, match="maxiter") as info:
        CG(tol=1e-12, maxiter=3, on_fail="raise").solve(product(a), b, what="my solve")
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, higher.HigherError)
    assert str(err).startswith("my solve: cg did not converge")
    assert err.result.status == "maxiter" and err.result.iterations == 3


def test_convergence_errors_and_warnings_pickle_with_their_result() -> None:
    a, b = spd(10, 1e-3, 10.0), rhs(10)
    with pytest.raises(ConvergenceError) as info:
        CG(maxiter=1, on_fail="raise").solve(product(a), b)
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value) and copy.result.iterations == 1
    warning = ConvergenceWarning("message", info.value.result)
    assert pickle.loads(pickle.dumps(warning)).result.status == "maxiter"


def test_cg_reports_negative_curvature() -> None:
    a = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=DT))
    with pytest.warns(ConvergenceWarning, match="not positive definite") as seen:
        result = CG().solve(product(a), torch.ones(3, dtype=DT))
    assert result.status == "negative curvature" and not result.converged
    warning = seen[0].message
    assert isinstance(warning, ConvergenceWarning) and warning.result.status == result.status
    with pytest.raises(ConvergenceError, match="negative curvature"):
        CG(on_fail="raise").solve(product(a), torch.ones(3, dtype=DT))


def test_cg_measures_the_final_residual_instead_of_trusting_the_recurrence() -> None:
    """An operator that drifts after the iterations: the recurrence says converged, the
    measured residual does not, and the solve reports it (status "stalled")."""
    a, b = spd(6, 1.0, 3.0), rhs(6)
    calls = []

    def drifting(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ v + (1e-3 if len(calls) > 6 else 0.0)

    with pytest.warns(ConvergenceWarning, match=r"\(stalled\)"):
        result = CG(tol=1e-10).solve(drifting, b)
    assert result.status == "stalled" and not result.converged


def test_neumann_converges_to_the_solve_with_a_safe_step() -> None:
    a, b = spd(20, 1.0, 4.0), rhs(20)
    result = Neumann(alpha=1 / 4, tol=1e-10, maxiter=500).solve(product(a), b)
    assert result.converged and rel_err(result.solution, torch.linalg.solve(a, b)) < 1e-9
    # the error shrinks by 1 - 1/4 per term: about log(1e-10) / log(3/4) = 80 terms
    assert 60 < result.iterations < 100 and result.matvecs == result.iterations


def test_neumann_diverges_when_alpha_is_too_large() -> None:
    a, b = spd(20, 1.0, 4.0), rhs(20)
    with pytest.raises(ConvergenceError, match=r"diverged.*lower alpha"):
        Neumann(alpha=0.6, on_fail="raise").solve(product(a), b)  # 0.6 > 2 / 4
    with pytest.warns(ConvergenceWarning, match="diverged"):
        result = Neumann(alpha=0.1).solve(product(-a), b)  # negative definite
    assert result.status == "diverged" and result.residual > 10 * float(b.norm())


def test_neumann_truncated_series_is_reported() -> None:
    a, b = spd(20, 1.0, 4.0), rhs(20)
    with pytest.warns(ConvergenceWarning, match="maxiter"):
        result = Neumann(alpha=1 / 4, maxiter=5).solve(product(a), b)
    assert result.iterations == 5 and result.status == "maxiter"
    # the truncated series itself: alpha * sum_{k<5} (I - alpha A)^k b
    m = torch.eye(20, dtype=DT) - a / 4
    series = sum(torch.linalg.matrix_power(m, k) @ b for k in range(5)) / 4
    assert isinstance(series, torch.Tensor)
    torch.testing.assert_close(result.solution, series, rtol=1e-12, atol=1e-14)


def test_direct_reports_a_singular_matrix() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    with pytest.warns(ConvergenceWarning, match="singular"):
        result = Direct().solve(product(a), torch.ones(3, dtype=DT))
    assert result.status == "singular" and not result.converged


def test_direct_refines_until_the_tolerance() -> None:
    """Iterative refinement: a matrix whose product is exact but whose dense copy (what LU
    sees) is perturbed still reaches the tolerance, in a few refinement steps."""
    a, b = spd(10, 1.0, 2.0), rhs(10)
    calls = []

    def product_with_a_wrong_build(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return (a + (1e-3 if len(calls) <= 10 else 0.0)) @ v  # the 10 build products are off

    result = Direct(tol=1e-12, maxiter=10).solve(product_with_a_wrong_build, b)
    assert result.converged and 1 <= result.iterations <= 10
    assert rel_err(result.solution, torch.linalg.solve(a, b)) < 1e-10
    calls.clear()
    with pytest.warns(ConvergenceWarning, match="maxiter"):
        unrefined = Direct(tol=1e-12, maxiter=0).solve(product_with_a_wrong_build, b)
    assert not unrefined.converged and unrefined.iterations == 0


def test_direct_refuses_a_matrix_above_max_size() -> None:
    with pytest.raises(ImplicitError, match=r"dense 5×5 matrix, above max_size=4"):
        Direct(max_size=4).solve(lambda v: v, torch.ones(5, dtype=DT))


@pytest.mark.parametrize(
    ("kind", "options", "error", "match"),
    [
        (CG, {"tol": -1.0}, ImplicitError, "tol must be a finite number >= 0, got -1.0"),
        (CG, {"atol": float("nan")}, ImplicitError, "atol must be a finite number"),
        (CG, {"maxiter": 0}, ImplicitError, "maxiter must be >= 1, got 0"),
        (CG, {"maxiter": 2.5}, higher.UsageError, "maxiter must be an int, got float"),
        (CG, {"tol": "small"}, higher.UsageError, "tol must be a float, got str"),
        (CG, {"on_fail": "ignore"}, ImplicitError, "on_fail must be 'warn' or 'raise'"),
        (Neumann, {"alpha": 0.0}, ImplicitError, "alpha must be a finite number > 0"),
        (Neumann, {"alpha": None}, higher.UsageError, "alpha must be a float"),
        (Direct, {"maxiter": -1}, ImplicitError, "maxiter must be >= 0"),
        (Direct, {"max_size": 0}, ImplicitError, "max_size must be >= 1"),
    ],
)
def test_bad_options_are_refused(
    kind: type, options: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        kind(**options)
    assert issubclass(error, higher.HigherError)
    assert issubclass(error, ValueError if error is ImplicitError else TypeError)


def test_bad_right_hand_sides_are_refused() -> None:
    with pytest.raises(ImplicitError, match=r"b must be a 1-D floating-point tensor, got shape"):
        CG().solve(lambda v: v, torch.ones(2, 2, dtype=DT))
    with pytest.raises(ImplicitError, match=r"dtype torch\.int64"):
        CG().solve(lambda v: v, torch.ones(2, dtype=torch.long))
    with pytest.raises(higher.UsageError, match="b must be a Tensor, got list"):
        Direct().solve(lambda v: v, [1.0, 2.0])  # type: ignore[arg-type]


def test_solvers_are_frozen_and_satisfy_the_protocol() -> None:
    solver = CG()
    assert isinstance(solver, LinearSolver)
    with pytest.raises(AttributeError):
        solver.tol = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "module", ["higher.implicit", "higher.implicit._solve", "higher.implicit._linsolve"]
)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"higher": higher, "torch": torch}, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_every_public_name_is_exported_and_documented() -> None:
    assert "implicit" in higher.__all__ and higher.implicit is importlib.import_module(
        "higher.implicit"
    )
    for name in higher.implicit.__all__:
        assert getattr(higher.implicit, name).__doc__, name
