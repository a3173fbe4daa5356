"""What higher.implicit does with numbers it cannot trust: NaN or inf anywhere gives NaN in every
entry (and the solve's report), never a finite hypergradient; a point that is not stationary is
measured and reported (warned, or raised by on_fail="raise"); a solver class stands for its
default instance; custom_root checks its solver's output against the initial solution."""

from __future__ import annotations

import math
import pickle
import warnings
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
    NotStationaryError,
    NotStationaryWarning,
    Stationarity,
    Task,
    custom_root,
    hypergrad,
    hypergrad_batch,
)

DT = torch.float64
Tensor = torch.Tensor
SOLVERS: list[CG | Neumann | Direct] = [CG(), Neumann(alpha=0.5, maxiter=500), Direct()]
IDS = ["cg", "neumann", "direct"]


class Ridge:
    """Ridge regression with one log-penalty per feature, its closed-form solution."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = (
            torch.randn(40, 5, generator=g, dtype=DT),
            torch.randn(40, generator=g, dtype=DT),
        )
        self.xv, self.yv = (
            torch.randn(20, 5, generator=g, dtype=DT),
            torch.randn(20, generator=g, dtype=DT),
        )
        self.h = torch.zeros(5, dtype=DT, requires_grad=True)

    def inner(self, w: Tensor, h: Tensor) -> Tensor:
        return ((self.x @ w - self.y) ** 2).mean() / 2 + (h.exp() * w**2).sum() / 2

    def outer(self, w: Tensor, h: Tensor) -> Tensor:
        return ((self.xv @ w - self.yv) ** 2).mean()

    def hessian(self) -> Tensor:
        return self.x.T @ self.x / len(self.x) + torch.diag(self.h.detach().exp())

    def solution(self) -> Tensor:
        out: Tensor = torch.linalg.solve(self.hessian(), self.x.T @ self.y / len(self.x))
        return out

    def reference(self) -> Tensor:
        a = self.x.T @ self.x / len(self.x) + torch.diag(self.h.exp())
        w = torch.linalg.solve(a, self.x.T @ self.y / len(self.x))
        return torch.autograd.grad(self.outer(w, self.h), self.h)[0]


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kwargs)


# ---- NaN and inf -------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_a_nan_outer_loss_gives_nan_in_every_entry(solver: LinearSolver) -> None:
    p = Ridge()
    with pytest.warns(ConvergenceWarning, match=r"not finite.*b has NaN or inf") as seen:
        result = hypergrad(p.inner, lambda w, h: p.outer(w, h) * math.nan, p.solution(), p.h,
                           solver=solver)  # fmt: skip
    assert torch.isnan(result.grads[0]).all()  # was a finite zero for CG and Neumann
    assert result.solves[0].status == "not finite" and result.solves[0].matvecs == 0
    assert torch.isnan(result.solves[0].solution).all()
    assert seen[0].message.result.status == "not finite"  # type: ignore[union-attr]


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_nan_in_the_solution_gives_nan_in_every_entry(solver: LinearSolver) -> None:
    p = Ridge()
    w = p.solution()
    w[0] = math.nan
    with pytest.warns(ConvergenceWarning, match="not finite"):
        result = hypergrad(p.inner, p.outer, w, p.h, solver=solver)
    assert torch.isnan(result.grads[0]).all()  # was [nan, 0, 0, 0, 0]
    assert math.isnan(result.stationarity[0].grad_norm)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_an_infinite_hyperparameter_gives_nan_or_raises(solver: CG | Neumann | Direct) -> None:
    p = Ridge()
    h = torch.tensor([0.0, 0.0, math.inf, 0.0, 0.0], dtype=DT, requires_grad=True)
    with pytest.warns(ConvergenceWarning, match="not finite"):
        result = hypergrad(p.inner, p.outer, p.solution(), h, solver=solver)
    assert not torch.isfinite(result.grads[0]).any()
    strict = type(solver)(on_fail="raise")
    with pytest.raises(ConvergenceError, match="not finite") as info:
        hypergrad(p.inner, p.outer, p.solution(), h, solver=strict)
    assert info.value.result.status == "not finite"


def test_the_solvers_return_nan_for_non_finite_input() -> None:
    b = torch.tensor([1.0, math.nan], dtype=DT)
    for solver in SOLVERS:
        result = quiet(solver.solve, lambda v: v, b)
        assert result.status == "not finite" and torch.isnan(result.solution).all(), solver
    a = torch.tensor([[1.0, 0.0], [0.0, math.nan]], dtype=DT)
    ones = torch.ones(2, dtype=DT)
    for solver in SOLVERS:  # a NaN product mid-solve: CG and Neumann stopped with a finite iterate
        result = quiet(solver.solve, lambda v: a @ v, ones)
        assert result.status == "not finite", (solver, result.status)  # Direct said "singular"
        assert torch.isnan(result.solution).all() and math.isnan(result.residual), solver


def test_custom_root_with_a_nan_cotangent_gives_nan_gradients() -> None:
    p = Ridge()

    @custom_root(lambda w, h: torch.autograd.grad(p.inner(w, h), w, create_graph=True)[0])
    def fit(w0: Tensor, h: Tensor) -> Tensor:
        return p.solution()

    w = fit(torch.zeros(5, dtype=DT), p.h)
    with pytest.warns(ConvergenceWarning, match="not finite"):
        (w.sum() * math.nan).backward()
    assert p.h.grad is not None and torch.isnan(p.h.grad).all()


# ---- stationarity ------------------------------------------------------------------------------


def test_at_the_solution_the_check_is_silent_and_reported() -> None:
    p = Ridge()
    result = hypergrad(p.inner, p.outer, p.solution(), p.h)
    (check,) = result.stationarity
    assert check.stationary and check.grad_norm < 1e-14 and check.distance < 1e-14
    assert check.threshold == pytest.approx(1e-3 * max(float(p.solution().norm()), 1.0))
    assert float((result.grads[0] - p.reference()).abs().max()) < 1e-8


@pytest.mark.parametrize("shift", [1e-2, 0.3])
def test_a_point_that_is_not_stationary_warns_with_its_gradient_norm(shift: float) -> None:
    p = Ridge()
    star = p.solution()
    w = star + shift
    with pytest.warns(NotStationaryWarning, match=r"params is not a stationary point") as seen:
        result = hypergrad(p.inner, p.outer, w, p.h)
    leaf = w.clone().requires_grad_()
    grad = torch.autograd.grad(p.inner(leaf, p.h.detach()), leaf)[0]
    (check,) = result.stationarity
    assert seen[0].message.stationarity == check  # type: ignore[union-attr]
    assert check.grad_norm == pytest.approx(float(grad.norm()), rel=1e-12)
    # a lower bound of the Newton step, which on a quadratic is the way to the minimum
    assert 0.1 * float((w - star).norm()) < check.distance <= float((w - star).norm())
    assert not check.stationary
    error = float((result.grads[0] - p.reference()).norm() / p.reference().norm())
    assert error > 1e-2  # what the warning is about: the hypergradient there is wrong


def test_not_stationary_raises_with_on_fail_raise_and_can_be_turned_off() -> None:
    p = Ridge()
    w = p.solution() + 0.1
    with pytest.raises(NotStationaryError, match="stationarity_tol") as info:
        hypergrad(p.inner, p.outer, w, p.h, solver=CG(on_fail="raise"))
    assert isinstance(info.value, ValueError) and info.value.stationarity.grad_norm > 0
    assert p.h.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = hypergrad(p.inner, p.outer, w, p.h, stationarity_tol=None)
        assert result.stationarity[0].threshold == math.inf
        hypergrad(p.inner, p.outer, w, p.h, stationarity_tol=0.5)


def test_a_batch_reports_each_task() -> None:
    p = Ridge()
    star = p.solution()
    tasks = [Task(p.inner, p.outer, star), Task(p.inner, p.outer, star + 0.1)]
    with pytest.warns(NotStationaryWarning, match=r"^hypergrad_batch \(task 1\)"):
        result = hypergrad_batch(tasks, p.h)
    assert [c.stationary for c in result.stationarity] == [True, False]


def test_custom_root_whose_solver_returns_no_root_warns_or_raises() -> None:
    p = Ridge()

    def optimality(w: Tensor, h: Tensor) -> Tensor:
        return torch.autograd.grad(p.inner(w, h), w, create_graph=True)[0]

    def make(**options: Any) -> Any:
        @custom_root(optimality, **options)
        def fit(w0: Tensor, h: Tensor) -> Tensor:
            return p.solution() + 0.02  # a few steps short of the minimum

        return fit

    out = make()(torch.zeros(5, dtype=DT), p.h)
    with pytest.warns(NotStationaryWarning, match=r"custom_root\(.*fit\): the solver's output is"):
        p.outer(out, p.h).backward()
    assert p.h.grad is not None and torch.isfinite(p.h.grad).all()
    p.h.grad = None
    out = make(solver=CG(on_fail="raise"))(torch.zeros(5, dtype=DT), p.h)
    with pytest.raises(NotStationaryError, match="not a root of optimality_fn"):
        p.outer(out, p.h).backward()
    assert p.h.grad is None


def test_records_pickle() -> None:
    check = Stationarity(0.5, 0.25, 1e-3)
    for err in (NotStationaryError("far", check), NotStationaryWarning("far", check)):
        back = pickle.loads(pickle.dumps(err))
        assert str(back) == "far" and back.stationarity == check


@pytest.mark.parametrize(
    ("tol", "error", "match"),
    [(0.0, ImplicitError, "finite number > 0"), (math.nan, ImplicitError, "finite number > 0"),
     ("1e-3", higher.UsageError, "must be a float or None, got str")],
)  # fmt: skip
def test_bad_stationarity_tol_is_refused(tol: Any, error: type, match: str) -> None:
    p = Ridge()
    with pytest.raises(error, match=match):
        hypergrad(p.inner, p.outer, p.solution(), p.h, stationarity_tol=tol)
    with pytest.raises(error, match=match):
        custom_root(lambda w: w, stationarity_tol=tol)


# ---- a solver class ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [CG, Direct, Neumann])
def test_a_solver_class_is_its_default_instance(kind: type[LinearSolver]) -> None:
    p = Ridge()
    alpha = {"alpha": 0.5} if kind is Neumann else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # Neumann's 100 default terms
        by_class = hypergrad(p.inner, p.outer, p.solution(), p.h, solver=kind)
    by_instance = quiet(hypergrad, p.inner, p.outer, p.solution(), p.h, solver=kind(**alpha))
    if kind is not Neumann:
        assert torch.equal(by_class.grads[0], by_instance.grads[0])
    assert by_class.solves[0].method == kind.method  # type: ignore[attr-defined]


def test_a_solver_class_with_custom_root_and_one_that_needs_arguments() -> None:
    p = Ridge()

    @custom_root(lambda w, h: torch.autograd.grad(p.inner(w, h), w, create_graph=True)[0],
                 solver=Direct)  # fmt: skip
    def fit(w0: Tensor, h: Tensor) -> Tensor:
        return p.solution()

    p.outer(fit(torch.zeros(5, dtype=DT), p.h), p.h).backward()
    assert p.h.grad is not None and float((p.h.grad - p.reference()).abs().max()) < 1e-8

    class Needy:
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def solve(self, matvec: Any, b: Tensor, *, what: str = "") -> Any:
            raise AssertionError("never called")

    with pytest.raises(higher.UsageError, match=r"solver=Needy is a class .* pass an instance"):
        hypergrad(p.inner, p.outer, p.solution(), p.h, solver=Needy)


# ---- custom_root: the solver's output against the initial solution ------------------------------


def test_a_solver_that_takes_the_parts_of_the_solution_separately_is_told_how_to_call_it() -> None:
    """A (weight, bias) solution, the solver written fit(w0, b0, lam): custom_root takes w0 for
    the whole initial solution and b0 for an argument; it said nothing, and the user's
    optimality function failed in the backward with `Tensor @ list`."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def optimality(w: Tensor, b: Tensor, lam: Tensor) -> list[Tensor]:
        r = x @ w + b - y
        return [x.T @ r / len(x) + lam * w, r.mean()]

    @custom_root(optimality, solver=Direct())
    def fit(w0: Tensor, b0: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
        reg = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DT)) * lam.detach()
        sol = torch.linalg.solve(xa.T @ xa / len(x) + reg, xa.T @ y / len(x))
        return sol[:3], sol[3]

    zero_b = torch.zeros((), dtype=DT)
    with pytest.raises(ImplicitError, match=r"returned 2 tensor\(s\) \[\(3,\) float64, \(\) "
                       r"float64\] for an initial solution .* of 1 \[\(3,\) float64\].*"
                       r"fit\(\(w0, b0\), lam\)"):  # fmt: skip
        fit(torch.zeros(3, dtype=DT), zero_b, lam)
    assert lam.grad is None


@pytest.mark.parametrize(
    ("init", "match"),
    [(torch.zeros(4, dtype=DT), r"\[\(3,\) float64\] for an initial solution .* \[\(4,\) float64"),
     (torch.zeros(3), r"\[\(3,\) float64\] for an initial solution .* \[\(3,\) float32\]")],
    ids=["shape", "dtype"],
)  # fmt: skip
def test_a_solver_output_of_another_shape_or_dtype_is_refused(init: Tensor, match: str) -> None:
    a = torch.ones(3, dtype=DT, requires_grad=True)

    def solver(t0: Any, a: Tensor) -> Tensor:
        return a.detach().clone()

    identity = custom_root(lambda t, a: t - a)(solver)
    with pytest.raises(ImplicitError, match=match) as info:
        identity(init, a)
    assert isinstance(info.value, ValueError)
    assert torch.equal(identity(torch.zeros(3, dtype=DT), a), a.detach())  # the match works
    assert torch.equal(identity(None, a), a.detach())  # no initial tensors: nothing to check
