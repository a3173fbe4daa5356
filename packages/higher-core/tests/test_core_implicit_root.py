"""higher.implicit.custom_root: a solver's output differentiable through its optimality
condition, in float64 against autograd through closed forms and through a long exact unroll."""

from __future__ import annotations

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
    custom_root,
)

DT = torch.float64
Tensor = torch.Tensor


def rel_err(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def dense_solve(a: Tensor, b: Tensor) -> Tensor:
    out: Tensor = torch.linalg.solve(a, b)
    return out


def data(n: int = 60, d: int = 6, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    return x, x @ w + 0.3 * torch.randn(n, generator=g, dtype=DT), xv, xv @ w


def ridge_gradient(theta: Tensor, h: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of |x theta - y|² / 2n + sum(exp(h) theta²) / 2, written out."""
    return x.T @ (x @ theta - y) / len(x) + h.exp() * theta


def closed(h: Tensor, x: Tensor, y: Tensor) -> Tensor:
    a = x.T @ x / len(x) + torch.diag(h.exp())
    return dense_solve(a, x.T @ y / len(x))


@pytest.mark.parametrize(
    ("solver", "tolerance"), [(Direct(), 1e-8), (CG(tol=1e-10), 1e-6)], ids=["direct", "cg"]
)
def test_ridge_backward_reaches_the_hyperparameter(solver: LinearSolver, tolerance: float) -> None:
    x, y, xv, yv = data()
    h = torch.linspace(-2, 0, 6, dtype=DT).requires_grad_()
    init = torch.zeros(6, dtype=DT, requires_grad=True)

    @custom_root(ridge_gradient, solver=solver)
    def solve(theta0: Tensor, h: Tensor, x: Tensor, y: Tensor) -> Tensor:
        theta = theta0.detach()  # plain gradient descent, whatever it takes
        for _ in range(2000):
            theta = theta - 0.5 * ridge_gradient(theta, h.detach(), x, y)
        return theta

    theta = solve(init, h, x, y)
    assert not theta.is_leaf and theta.requires_grad
    ((xv @ theta - yv) ** 2).mean().backward()
    ref = torch.autograd.grad(((xv @ closed(h, x, y) - yv) ** 2).mean(), h)[0]
    assert h.grad is not None and rel_err(h.grad, ref) < tolerance
    assert init.grad is None  # where the solver started does not matter at a solution


def test_optimality_by_autograd_and_a_torch_optim_solver() -> None:
    """The usual TorchOpt/JAXopt shape: the optimality condition is the gradient of the
    objective (create_graph=True), the solver a torch optimizer that uses autograd itself."""
    x, y, xv, yv = data(seed=1)
    h = torch.linspace(-1, 1, 6, dtype=DT).requires_grad_()

    def objective(theta: Tensor, h: Tensor) -> Tensor:
        return ((x @ theta - y) ** 2).mean() / 2 + (h.exp() * theta**2).sum() / 2

    def optimality(theta: Tensor, h: Tensor) -> Tensor:
        return torch.autograd.grad(objective(theta, h), theta, create_graph=True)[0]

    @custom_root(optimality, solver=Direct())
    def solve(theta0: Tensor, h: Tensor) -> Tensor:
        theta = theta0.detach().clone().requires_grad_()
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-14,
                                tolerance_change=0, line_search_fn="strong_wolfe")  # fmt: skip

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective(theta, h.detach())
            loss.backward()
            return loss

        opt.step(closure)
        return theta

    theta = solve(torch.zeros(6, dtype=DT), h)
    grad = torch.autograd.grad(((xv @ theta - yv) ** 2).mean(), h)[0]
    ref = torch.autograd.grad(((xv @ closed(h, x, y) - yv) ** 2).mean(), h)[0]
    assert rel_err(grad, ref) < 1e-8


def test_tuple_solution_keyword_and_nested_arguments() -> None:
    """A (weight, bias) solution; hyperparameters in a dict keyword and a list; one of them
    appearing twice counts once."""
    x, y, xv, yv = data(seed=2)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    shift = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def optimality(sol: tuple[Tensor, Tensor], data: list[Tensor], *, hyper: dict[str, Tensor]
                   ) -> tuple[Tensor, Tensor]:  # fmt: skip
        w, b = sol
        x, y = data
        r = x @ w + b - (y + hyper["shift"])
        return x.T @ r / len(x) + hyper["lam"] * w, r.mean().reshape(()) + 0 * hyper["lam"]

    def closed_fit(lam: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
        reg = torch.diag(torch.cat([lam.expand(6), torch.zeros(1, dtype=DT)]))
        sol = torch.linalg.solve(xa.T @ xa / len(x) + reg, xa.T @ (y + shift) / len(x))
        return sol[:6], sol[6]

    @custom_root(optimality, solver=Direct())
    def solve(init: Any, data: list[Tensor], *, hyper: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return closed_fit(hyper["lam"], hyper["shift"])

    w, b = solve(None, [x, y], hyper={"lam": lam, "shift": shift})
    loss = ((xv @ w + b - yv) ** 2).mean()
    grads = torch.autograd.grad(loss, [lam, shift])
    rw, rb = closed_fit(lam, shift)
    refs = torch.autograd.grad(((xv @ rw + rb - yv) ** 2).mean(), [lam, shift])
    for got, ref in zip(grads, refs):
        assert rel_err(got, ref) < 1e-10


def test_nonsymmetric_fixed_point_matches_a_long_exact_unroll() -> None:
    """A fixed point x = tanh(W x + u) with a non-symmetric W (a one-layer equilibrium model):
    the optimality condition x - tanh(Wx + u) has a non-symmetric Jacobian; Direct handles it.
    The reference differentiates through 200 exact fixed-point iterations."""
    g = torch.Generator().manual_seed(4)
    w = 0.4 * torch.randn(5, 5, generator=g, dtype=DT) / 5**0.5  # a contraction
    assert not torch.allclose(w, w.T)
    u = torch.randn(5, generator=g, dtype=DT, requires_grad=True)

    def step(z: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(w @ z + u)

    @custom_root(lambda z, u: z - step(z, u), solver=Direct(tol=1e-12))
    def equilibrium(z0: Tensor, u: Tensor) -> Tensor:
        z = z0
        with torch.no_grad():
            for _ in range(200):
                z = step(z, u)
        return z

    z = equilibrium(torch.zeros(5, dtype=DT), u)
    got = torch.autograd.grad((z**3).sum(), u)[0]
    unrolled = torch.zeros(5, dtype=DT)
    for _ in range(200):
        unrolled = step(unrolled, u)
    torch.testing.assert_close(z, unrolled, rtol=0, atol=1e-15)
    ref = torch.autograd.grad((unrolled**3).sum(), u)[0]
    assert rel_err(got, ref) < 1e-12


def _ridge_root(solver: LinearSolver) -> tuple[Tensor, Tensor]:
    """Ridge under custom_root with penalties spread over 4 decades (CG needs 6 iterations):
    the output and its hyperparameter."""
    x, y, _, _ = data(seed=3)
    h = torch.linspace(-6, 3, 6, dtype=DT).requires_grad_()

    @custom_root(ridge_gradient, solver=solver)
    def solve(theta0: Tensor, h: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return closed(h.detach(), x, y)

    return solve(torch.zeros(6, dtype=DT), h, x, y), h


def test_backward_that_does_not_converge_warns_or_raises() -> None:
    theta, h = _ridge_root(CG(maxiter=2))
    with pytest.warns(ConvergenceWarning, match=r"^custom_root\(.*solve\): cg did not converge"):
        theta.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    theta, h = _ridge_root(CG(maxiter=2, on_fail="raise"))
    with pytest.raises(ConvergenceError, match="maxiter") as info:
        theta.sum().backward()
    assert info.value.result.iterations == 2
    assert h.grad is None


def test_nothing_to_differentiate_gives_a_detached_solution() -> None:
    @custom_root(lambda t, a: t - a)
    def solve(t0: Tensor, a: Tensor) -> Tensor:
        return a * 1.0

    a = torch.ones(3, requires_grad=True)
    assert not solve(torch.zeros(3), torch.ones(3)).requires_grad
    with torch.no_grad():
        assert not solve(torch.zeros(3), a).requires_grad
    out = solve(torch.zeros(3), a)
    assert out.requires_grad
    assert torch.equal(torch.autograd.grad(out.sum(), a)[0], torch.ones(3))  # d(a)/d(a)


def test_bad_input() -> None:
    with pytest.raises(higher.UsageError, match="optimality_fn must be callable"):
        custom_root(None)  # type: ignore[arg-type]
    with pytest.raises(higher.UsageError, match="solver must be a linear solver"):
        custom_root(lambda t: t, solver=3)  # type: ignore[arg-type]
    with pytest.raises(higher.UsageError, match="the decorated solver must be callable"):
        custom_root(lambda t: t)(5)  # type: ignore[type-var]

    a = torch.ones(3, dtype=DT, requires_grad=True)
    identity = custom_root(lambda t, a: t - a)
    with pytest.raises(higher.UsageError, match="takes the initial solution as its first"):
        identity(lambda: a)()
    with pytest.raises(higher.UsageError, match="must return a Tensor or a non-empty list"):
        identity(lambda t, a: [1.0])(None, a)

    def run(optimality: Any) -> None:
        out = custom_root(optimality)(lambda t, a: a.detach())(None, a)
        out.sum().backward()

    with pytest.raises(ImplicitError, match="returned 2 tensor"):
        run(lambda t, a: [t - a, t - a])
    with pytest.raises(ImplicitError, match=r"output \[0\] has shape \(2,\)"):
        run(lambda t, a: (t - a)[:2])
    with pytest.raises(ImplicitError, match="does not depend on the solution"):
        run(lambda t, a: (t - a).detach())
    with pytest.raises(higher.UsageError, match="optimality_fn must return a Tensor"):
        run(lambda t, a: "residual")
    assert a.grad is None
