"""higher.implicit.hypergrad in float64 against independent references: autograd through the
closed-form ridge solution, the dense implicit-function formula for L2-logistic regression, a
long exact unroll through `innerloop_ctx` (override hyperparameters), the published iMAML
meta-gradient, and the data gradient; batches of tasks; failures and bad input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import higher
from higher.implicit import (
    CG,
    ConvergenceError,
    ConvergenceWarning,
    Direct,
    ImplicitError,
    LinearSolver,
    Neumann,
    NotStationaryWarning,
    SolveResult,
    Task,
    hypergrad,
    hypergrad_batch,
)

DT = torch.float64
Tensor = torch.Tensor


def rel_err(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def dense_solve(a: Tensor, b: Tensor) -> Tensor:
    out: Tensor = torch.linalg.solve(a, b)
    return out


class Ridge:
    """Ridge regression with one log-penalty per feature; `theta(h)` is the closed form."""

    def __init__(self, n: int = 80, d: int = 10, seed: int = 0, ill: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g, dtype=DT)
        if ill:  # nearly collinear features: a badly conditioned Hessian
            self.x = self.x[:, :1] + 1e-3 * self.x
        w = torch.randn(d, generator=g, dtype=DT)
        self.y = self.x @ w + 0.3 * torch.randn(n, generator=g, dtype=DT)
        self.xv = torch.randn(n // 2, d, generator=g, dtype=DT)
        self.yv = self.xv @ w + 0.3 * torch.randn(n // 2, generator=g, dtype=DT)
        self.h = (0.5 * torch.randn(d, generator=g, dtype=DT) - 1).requires_grad_()

    def inner(self, theta: Tensor, h: Tensor) -> Tensor:
        return ((self.x @ theta - self.y) ** 2).mean() / 2 + (h.exp() * theta**2).sum() / 2

    def outer(self, theta: Tensor, h: Tensor) -> Tensor:
        return ((self.xv @ theta - self.yv) ** 2).mean()

    def hessian(self, h: Tensor) -> Tensor:
        return self.x.T @ self.x / len(self.x) + torch.diag(h.exp())

    def theta(self, h: Tensor) -> Tensor:
        return dense_solve(self.hessian(h), self.x.T @ self.y / len(self.x))

    def reference(self) -> Tensor:
        """d outer / d h through the closed form, by plain autograd."""
        return torch.autograd.grad(self.outer(self.theta(self.h), self.h), self.h)[0]


# ---- ridge: closed form ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "tolerance"),
    [(Direct(), 1e-8), (CG(tol=1e-10), 1e-6), (Neumann(alpha=0.5, tol=1e-10, maxiter=2000), 1e-6)],
    ids=["direct", "cg", "neumann"],
)
def test_ridge_matches_the_closed_form(solver: LinearSolver, tolerance: float) -> None:
    p = Ridge()
    result = hypergrad(p.inner, p.outer, p.theta(p.h).detach(), p.h, solver=solver)
    assert rel_err(result.grads[0], p.reference()) < tolerance
    (solve,) = result.solves
    assert solve.converged and solve.residual <= solve.threshold
    assert p.h.grad is None  # returned, never accumulated


@pytest.mark.parametrize("ways", [0, 1, 2], ids=["forward-over-reverse", "batched", "loop"])
def test_direct_builds_the_same_matrix_every_way(
    ways: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct builds the Hessian by forward mode over the backward, else by a batched backward,
    else one product per column (when an op lacks what a way needs): all give the answer."""
    from higher.implicit import _solve as _implicit

    def refuse(self: object, rows: Tensor) -> Tensor:
        raise NotImplementedError("no formula")

    calls = []

    def counted(self: Any, row: Tensor) -> Tensor:
        calls.append(1)
        return original(self, row)

    for name in ("_forward_over_reverse", "_batched_backward")[:ways]:
        monkeypatch.setattr(_implicit._Operator, name, refuse)
    original = _implicit._Operator.__call__
    monkeypatch.setattr(_implicit._Operator, "__call__", counted)
    p = Ridge()
    result = hypergrad(p.inner, p.outer, p.theta(p.h).detach(), p.h, solver=Direct())
    assert rel_err(result.grads[0], p.reference()) < 1e-10
    assert result.solves[0].matvecs == 10 + 1
    # the residual's check and the stationarity check are one product each; the loop makes one
    # per column besides, the forward mode one batched call, the batched backward none
    assert len(calls) == 2 + {0: 1, 1: 0, 2: 10}[ways]


def test_neumann_step_condition_on_ridge() -> None:
    """alpha above 2 / lambda_max(H) diverges, and says so."""
    p = Ridge()
    top = float(torch.linalg.eigvalsh(p.hessian(p.h.detach())).max())
    with pytest.raises(ConvergenceError, match=r"hypergrad: neumann did not converge \(diverged\)"):
        hypergrad(p.inner, p.outer, p.theta(p.h).detach(), p.h,
                  solver=Neumann(alpha=2.2 / top, on_fail="raise"))  # fmt: skip


def test_solution_given_in_every_form_gives_the_same_hypergradient() -> None:
    p = Ridge()
    theta = p.theta(p.h).detach()
    ref = p.reference()
    solver = CG(tol=1e-12)

    def on_list(params: list[Tensor], h: Tensor) -> Tensor:
        assert isinstance(params, list)
        return p.inner(params[0], h)

    def on_dict(params: dict[str, Tensor], h: Tensor) -> Tensor:
        assert list(params) == ["w"]
        return p.inner(params["w"], h)

    forms: list[tuple[Any, Callable[[Any, Tensor], Tensor], Callable[[Any, Tensor], Tensor]]] = [
        (theta, p.inner, p.outer),
        ([theta], on_list, lambda ps, h: p.outer(ps[0], h)),
        ((theta,), on_list, lambda ps, h: p.outer(ps[0], h)),
        ({"w": theta}, on_dict, lambda ps, h: p.outer(ps["w"], h)),
    ]
    for params, inner, outer in forms:
        result = hypergrad(inner, outer, params, p.h, solver=solver)
        assert rel_err(result.grads[0], ref) < 1e-9


def test_outer_loss_that_reads_the_hyperparameter_directly() -> None:
    p = Ridge()

    def outer(theta: Tensor, h: Tensor) -> Tensor:
        return p.outer(theta, h) + 0.1 * (h**2).sum()

    ref = torch.autograd.grad(outer(p.theta(p.h), p.h), p.h)[0]
    got = hypergrad(p.inner, outer, p.theta(p.h).detach(), p.h, solver=Direct()).grads[0]
    assert rel_err(got, ref) < 1e-10


# ---- a functional model solved by diffopt steps; an override hyperparameter ----------------------


def test_override_hyperparameter_matches_a_long_exact_unroll_and_the_closed_form() -> None:
    """SGD's weight decay given through `override` as a tensor: the implicit hypergradient at
    the fmodel's solution equals the gradient through the whole (converged) unroll, and the
    closed form of the problem SGD minimizes (mse + wd/2 |w|²)."""
    p = Ridge(n=60, d=6, seed=3)
    model = torch.nn.Linear(6, 1, bias=False).to(DT)
    wd = torch.tensor(0.1, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=0.1)
    y, yv = p.y.unsqueeze(1), p.yv.unsqueeze(1)
    with higher.innerloop_ctx(model, opt, override={"weight_decay": [wd]}) as (fmodel, diffopt):
        for _ in range(300):
            diffopt.step(F.mse_loss(fmodel(p.x), y))
        unrolled = torch.autograd.grad(F.mse_loss(fmodel(p.xv), yv), wd)[0]
        solution = fmodel.fast_params

        def inner(params: list[Tensor], wd: Tensor) -> Tensor:
            return F.mse_loss(fmodel(p.x, params=params), y) + wd / 2 * params[0].pow(2).sum()

        def outer(params: list[Tensor], wd: Tensor) -> Tensor:
            return F.mse_loss(fmodel(p.xv, params=params), yv)

        result = hypergrad(inner, outer, fmodel, wd, solver=Direct())
        # the losses ran the model at the solution's copies: its own weights were put back
        assert all(a is b for a, b in zip(fmodel.fast_params, solution))

    def closed(wd: Tensor) -> Tensor:
        a = 2 * p.x.T @ p.x / len(p.x) + wd * torch.eye(6, dtype=DT)
        return dense_solve(a, 2 * p.x.T @ p.y / len(p.x))

    ref = torch.autograd.grad(((p.xv @ closed(wd) - p.yv) ** 2).mean(), wd)[0]
    assert rel_err(result.grads[0], ref) < 1e-8
    assert rel_err(unrolled, ref) < 1e-8
    assert model.weight.grad is None and wd.grad is None


# ---- L2-logistic regression: the dense formula -------------------------------------------------


def test_l2_logistic_regression_matches_the_dense_formula() -> None:
    g = torch.Generator().manual_seed(5)
    n, d = 120, 8
    x = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(x @ w_true)).to(DT)
    xv = torch.randn(60, d, generator=g, dtype=DT)
    yv = (torch.rand(60, generator=g, dtype=DT) < torch.sigmoid(xv @ w_true)).to(DT)
    h = (torch.randn(d, generator=g, dtype=DT) - 2).requires_grad_()
    lam = h.detach().exp()

    def inner(w: Tensor, h: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(x @ w, y) + (h.exp() * w**2).sum() / 2

    def outer(w: Tensor, h: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(xv @ w, yv)

    # the inner solution by Newton's method, to machine precision
    w = torch.zeros(d, dtype=DT)
    for _ in range(30):
        s = torch.sigmoid(x @ w)
        grad = x.T @ (s - y) / n + lam * w
        hess = x.T @ (x * (s * (1 - s)).unsqueeze(1)) / n + torch.diag(lam)
        w = w - torch.linalg.solve(hess, grad)
    s = torch.sigmoid(x @ w)
    assert float((x.T @ (s - y) / n + lam * w).abs().max()) < 1e-15
    hess = x.T @ (x * (s * (1 - s)).unsqueeze(1)) / n + torch.diag(lam)
    grad_outer = xv.T @ (torch.sigmoid(xv @ w) - yv) / len(xv)
    # d theta*/d h_j = -H^-1 e_j lam_j theta_j, so d outer/d h_j = -lam_j theta_j [H^-1 g]_j
    ref = -lam * w * torch.linalg.solve(hess, grad_outer)

    assert rel_err(hypergrad(inner, outer, w, h, solver=Direct()).grads[0], ref) < 1e-8
    assert rel_err(hypergrad(inner, outer, w, h, solver=CG(tol=1e-10)).grads[0], ref) < 1e-6


# ---- the data gradient -------------------------------------------------------------------------


def test_per_example_weights() -> None:
    """Bilevel data reweighting: d validation loss / d per-example weights of the training
    loss, against autograd through the weighted closed form."""
    p = Ridge(n=40, d=5, seed=7)
    v = torch.rand(40, generator=torch.Generator().manual_seed(8), dtype=DT).requires_grad_()
    lam = 0.3

    def inner(theta: Tensor, v: Tensor) -> Tensor:
        return (v * (p.x @ theta - p.y) ** 2).mean() / 2 + lam / 2 * theta.pow(2).sum()

    def closed(v: Tensor) -> Tensor:
        a = p.x.T @ (v.unsqueeze(1) * p.x) / 40 + lam * torch.eye(5, dtype=DT)
        return dense_solve(a, p.x.T @ (v * p.y) / 40)

    ref = torch.autograd.grad(p.outer(closed(v), v), v)[0]
    got = hypergrad(inner, p.outer, closed(v).detach(), v, solver=Direct()).grads[0]
    assert rel_err(got, ref) < 1e-8


def test_training_inputs_and_targets() -> None:
    p = Ridge(n=30, d=4, seed=9)
    x, y = p.x.clone().requires_grad_(), p.y.clone().requires_grad_()
    lam = 0.2

    def inner(theta: Tensor, data: list[Tensor]) -> Tensor:
        x, y = data
        return ((x @ theta - y) ** 2).mean() / 2 + lam / 2 * theta.pow(2).sum()

    def closed(x: Tensor, y: Tensor) -> Tensor:
        return dense_solve(x.T @ x / 30 + lam * torch.eye(4, dtype=DT), x.T @ y / 30)

    refs = torch.autograd.grad(p.outer(closed(x, y), x), [x, y])
    theta = closed(x, y).detach()
    result = hypergrad(inner, lambda t, data: p.outer(t, x), theta, [x, y], solver=CG(tol=1e-10))
    for got, ref in zip(result.grads, refs):
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-6


# ---- iMAML -------------------------------------------------------------------------------------


class IMAML:
    """A small MLP adapted by proximal regularization to its meta-initialization."""

    def __init__(self, lam: float = 2.0) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(1, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)
        ).to(DT)
        self.lam = lam
        # the meta-initialization: the hyperparameter
        self.init: list[Tensor] = list(self.model.parameters())

    def task(self, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        amp, phase = 0.5 + torch.rand(1, generator=g, dtype=DT), torch.rand(1, generator=g)
        xs = torch.rand(10, 1, generator=g, dtype=DT) * 6 - 3
        xq = torch.rand(10, 1, generator=g, dtype=DT) * 6 - 3
        return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)

    def adapt(self, xs: Tensor, ys: Tensor) -> higher.patch.FunctionalModule:
        """The inner problem solved with diffopt steps (no graph kept: track_higher_grads=False)."""
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        with higher.innerloop_ctx(self.model, opt, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(1500):
                diffopt.step(self.inner(fmodel, xs, ys)(fmodel.fast_params, self.init))
        return fmodel

    def inner(
        self, fmodel: higher.patch.FunctionalModule, xs: Tensor, ys: Tensor
    ) -> Callable[[list[Tensor], list[Tensor]], Tensor]:
        def loss(params: list[Tensor], init: list[Tensor]) -> Tensor:
            prox = sum((p - p0).pow(2).sum() for p, p0 in zip(params, init))
            return F.mse_loss(fmodel(xs, params=params), ys) + self.lam / 2 * prox

        return loss

    def formula(self, fmodel: higher.patch.FunctionalModule, task: tuple[Tensor, ...]) -> Tensor:
        """Rajeswaran et al. (2019): (I + H/lam)^-1 grad L_test at the adapted weights, with H
        the Hessian of the training loss; a dense Hessian and solve, flat."""
        xs, ys, xq, yq = task
        theta = torch.cat([p.detach().reshape(-1) for p in fmodel.fast_params])
        shapes = [p.shape for p in fmodel.fast_params]
        names = [n for n, _ in self.model.named_parameters()]

        def unflat(flat: Tensor) -> dict[str, Tensor]:
            parts = flat.split([s.numel() for s in shapes])
            return {n: t.view(s) for n, t, s in zip(names, parts, shapes)}

        def train(flat: Tensor) -> Tensor:
            return F.mse_loss(torch.func.functional_call(self.model, unflat(flat), (xs,)), ys)

        def test(flat: Tensor) -> Tensor:
            return F.mse_loss(torch.func.functional_call(self.model, unflat(flat), (xq,)), yq)

        hess = torch.autograd.functional.hessian(train, theta)
        g_test = torch.autograd.functional.jacobian(test, theta)
        eye = torch.eye(len(theta), dtype=DT)
        return dense_solve(eye + hess / self.lam, g_test)


def flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize(
    ("solver", "tolerance"), [(Direct(), 1e-8), (CG(tol=1e-10), 1e-6)], ids=["direct", "cg"]
)
def test_imaml_matches_the_published_meta_gradient(solver: LinearSolver, tolerance: float) -> None:
    m = IMAML()
    task = m.task(0)
    xs, ys, xq, yq = task
    fmodel = m.adapt(xs, ys)
    grad_inner = torch.autograd.grad(m.inner(fmodel, xs, ys)(fmodel.fast_params, m.init),
                                     fmodel.fast_params)  # fmt: skip
    assert float(flat(list(grad_inner)).abs().max()) < 1e-9  # the inner problem is solved

    def outer(params: list[Tensor], init: list[Tensor]) -> Tensor:
        return F.mse_loss(fmodel(xq, params=params), yq)

    result = hypergrad(m.inner(fmodel, xs, ys), outer, fmodel, m.init, solver=solver)
    assert [g.shape for g in result.grads] == [p.shape for p in m.init]
    assert rel_err(flat(result.grads), m.formula(fmodel, task)) < tolerance
    assert all(p.grad is None for p in m.init)


@pytest.mark.parametrize("copy", [True, False], ids=["copied-init", "init-is-the-model"])
def test_imaml_from_an_untracked_inner_loop_either_way(copy: bool) -> None:
    """An untracked inner loop with copy_initial_weights=False ties fast weights to the model's
    own by a straight-through link (first-order MAML): hypergrad must not let that link into a
    hypergradient taken with respect to those very weights. It leaves the model as it was."""
    m = IMAML()
    task = m.task(1)
    xs, ys, xq, yq = task
    opt = torch.optim.SGD(m.model.parameters(), lr=0.1)
    with higher.innerloop_ctx(
        m.model, opt, copy_initial_weights=copy, track_higher_grads=False
    ) as (fmodel, diffopt):
        for _ in range(1500):
            diffopt.step(m.inner(fmodel, xs, ys)(fmodel.fast_params, m.init))
        before = fmodel.fast_params

        def outer(params: list[Tensor], init: list[Tensor]) -> Tensor:
            return F.mse_loss(fmodel(xq, params=params), yq)

        if copy:
            result = hypergrad(m.inner(fmodel, xs, ys), outer, fmodel, m.init, solver=Direct())
            assert result.stationarity[0].grad_norm < 1e-12
        else:
            # Through the link, the steps' gradient of the proximal term is zero (it is taken
            # with respect to the model's weights, which p - p0 does not change): the loop
            # minimizes the training loss alone, a point the proximal objective is not
            # stationary at, and hypergrad says so. The formula still holds at that point.
            with pytest.warns(NotStationaryWarning, match="not a stationary point") as seen:
                result = hypergrad(m.inner(fmodel, xs, ys), outer, fmodel, m.init, solver=Direct())
            assert seen[0].message.stationarity.grad_norm > 1  # type: ignore[union-attr]
        assert rel_err(flat(result.grads), m.formula(fmodel, task)) < 1e-8
        assert fmodel.track_higher_grads is False
        assert all(torch.equal(a, b) for a, b in zip(fmodel.fast_params, before))
    assert all(p.grad is None for p in m.init)


# ---- batches of tasks --------------------------------------------------------------------------


def test_imaml_batch_of_tasks_is_the_mean_of_the_formula() -> None:
    m = IMAML()
    tasks, refs = [], []
    for seed in range(3):
        xs, ys, xq, yq = task = m.task(seed)
        fmodel = m.adapt(xs, ys)

        def outer(params: list[Tensor], init: list[Tensor], f: Any = fmodel, xq: Tensor = xq,
                  yq: Tensor = yq) -> Tensor:  # fmt: skip
            return F.mse_loss(f(xq, params=params), yq)

        tasks.append(Task(m.inner(fmodel, xs, ys), outer, fmodel))
        refs.append(m.formula(fmodel, task))
    mean = hypergrad_batch(tasks, m.init, solver=Direct())
    assert len(mean.solves) == 3 and all(s.converged for s in mean.solves)
    assert rel_err(flat(mean.grads), torch.stack(refs).mean(0)) < 1e-8
    total = hypergrad_batch(tasks, m.init, solver=CG(tol=1e-10), reduction="sum")
    assert rel_err(flat(total.grads), torch.stack(refs).sum(0)) < 1e-6


def test_stacked_tasks_in_one_call_equal_the_batch() -> None:
    """Tasks written as one batched loss over stacked weights: one joint solve (a block-diagonal
    Hessian) gives the sum of the tasks' hypergradients."""
    problems = [Ridge(n=40, d=5, seed=s) for s in range(4)]
    h = problems[0].h

    def inner(thetas: Tensor, h: Tensor) -> Tensor:
        return sum(p.inner(t, h) for p, t in zip(problems, thetas))  # type: ignore[return-value]

    def outer(thetas: Tensor, h: Tensor) -> Tensor:
        return sum(p.outer(t, h) for p, t in zip(problems, thetas))  # type: ignore[return-value]

    refs = [torch.autograd.grad(p.outer(p.theta(h), h), h)[0] for p in problems]
    thetas = torch.stack([p.theta(h) for p in problems]).detach()
    stacked = hypergrad(inner, outer, thetas, h, solver=CG(tol=1e-12))
    assert rel_err(stacked.grads[0], sum(refs)) < 1e-9  # type: ignore[arg-type]
    batch = hypergrad_batch(
        [(p.inner, p.outer, t) for p, t in zip(problems, thetas)], h, reduction="sum"
    )
    assert rel_err(batch.grads[0], sum(refs)) < 1e-5  # type: ignore[arg-type]


# ---- failures ----------------------------------------------------------------------------------


def test_cg_that_does_not_converge_warns_with_the_hypergradient_it_has() -> None:
    p = Ridge(ill=True)
    p.h = torch.full((10,), -12.0, dtype=DT, requires_grad=True)  # almost no penalty
    theta = p.theta(p.h).detach()
    with pytest.warns(ConvergenceWarning, match=r"^hypergrad: cg did not converge \(maxiter\)"):
        result = hypergrad(p.inner, p.outer, theta, p.h, solver=CG(maxiter=2))
    assert not result.solves[0].converged and result.solves[0].iterations == 2
    assert torch.isfinite(result.grads[0]).all()
    with pytest.raises(ConvergenceError) as info:
        hypergrad(p.inner, p.outer, theta, p.h, solver=CG(maxiter=2, on_fail="raise"))
    assert info.value.result.status == "maxiter"
    # the batch names the task
    tasks = [(p.inner, p.outer, theta)] * 2
    with pytest.raises(ConvergenceError, match=r"^hypergrad_batch \(task 0\): cg"):
        hypergrad_batch(tasks, p.h, solver=CG(maxiter=2, on_fail="raise"))


def test_saddle_point_cg_reports_negative_curvature_direct_is_exact() -> None:
    """At a saddle of the inner objective the Hessian is indefinite: CG says so; Direct solves
    the (nonsingular) system and matches the closed form of the stationary point."""
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def inner(t: Tensor, lam: Tensor) -> Tensor:  # Hessian [[2, lam], [lam, -2]]: a saddle
        return (t[0] - lam) ** 2 - t[1] ** 2 + lam * t[0] * t[1]

    def stationary(lam: Tensor) -> Tensor:  # 2 (t0 - lam) + lam t1 = 0, lam t0 - 2 t1 = 0
        t0 = 4 * lam / (4 + lam**2)
        return torch.stack([t0, lam * t0 / 2])

    def outer(t: Tensor, lam: Tensor) -> Tensor:
        return t[0] + 3 * t[1]

    theta = stationary(lam).detach()
    with pytest.warns(ConvergenceWarning, match="negative curvature"):
        hypergrad(inner, outer, theta, lam)
    ref = torch.autograd.grad(outer(stationary(lam), lam), lam)[0]
    got = hypergrad(inner, outer, theta, lam, solver=Direct()).grads[0]
    assert float(abs(got - ref)) < 1e-14


# ---- bad input ---------------------------------------------------------------------------------


def _ridge_call(**change: Any) -> Any:
    p = Ridge(n=20, d=3)
    args: dict[str, Any] = {
        "inner_loss": p.inner,
        "outer_loss": p.outer,
        "params": p.theta(p.h).detach(),
        "hyper": p.h,
    }
    args.update(change)
    return hypergrad(**args)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"inner_loss": "loss"}, higher.UsageError, "inner_loss must be callable, got str"),
        ({"outer_loss": None}, higher.UsageError, "outer_loss must be callable, got NoneType"),
        ({"hyper": torch.ones(3)}, ImplicitError, r"hyper\[0\] does not require grad"),
        ({"hyper": []}, ImplicitError, "hyper is empty"),
        ({"hyper": 0.5}, higher.UsageError, "hyper must be a Tensor or a sequence"),
        ({"params": 3}, higher.UsageError, "params must be a Tensor, a sequence or mapping"),
        ({"params": []}, ImplicitError, "params is empty"),
        ({"params": torch.ones(3, dtype=torch.long)}, ImplicitError, "expected floating point"),
        (
            {"params": [torch.ones(3, dtype=DT), torch.ones(1)], "inner_loss": lambda p, h: 0},
            ImplicitError,
            "must share one dtype and device",
        ),
        ({"inner_loss": lambda t, h: t * h.exp()}, ImplicitError, r"scalar, got .* shape \(3,\)"),
        ({"inner_loss": lambda t, h: 1.0}, higher.UsageError, "must return a Tensor, got float"),
        (
            {"inner_loss": lambda t, h: (t * h).sum()},
            ImplicitError,
            "does not depend on the solution .*linear in params",
        ),
        (
            {"outer_loss": lambda t, h: t.detach().sum()},
            ImplicitError,
            "outer_loss depends on neither params nor hyper",
        ),
        ({"solver": "cg"}, higher.UsageError, "solver must be a linear solver"),
    ],
)
def test_bad_input_is_refused(change: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _ridge_call(**change)


def test_a_weight_the_inner_loss_ignores_is_refused() -> None:
    p = Ridge(n=20, d=3)
    theta = p.theta(p.h).detach()
    with pytest.raises(ImplicitError, match=r"does not depend on params \[1\]"):
        hypergrad(lambda ps, h: p.inner(ps[0], h), lambda ps, h: p.outer(ps[0], h),
                  [theta, torch.zeros(2, dtype=DT)], p.h)  # fmt: skip


def test_batch_input_is_checked() -> None:
    p = Ridge(n=20, d=3)
    task = (p.inner, p.outer, p.theta(p.h).detach())
    with pytest.raises(ImplicitError, match="tasks is empty"):
        hypergrad_batch([], p.h)
    with pytest.raises(ImplicitError, match="reduction must be 'mean' or 'sum', got 'max'"):
        hypergrad_batch([task], p.h, reduction="max")  # type: ignore[arg-type]
    with pytest.raises(higher.UsageError, match=r"tasks\[1\] must be a Task"):
        hypergrad_batch([task, (p.inner, p.outer)], p.h)  # type: ignore[list-item]
    with pytest.raises(higher.UsageError, match="tasks must be an iterable of Task"):
        hypergrad_batch(task[2], p.h)


def test_a_rejected_call_leaves_the_functional_model_as_it_was() -> None:
    model = torch.nn.Linear(3, 1).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    h = torch.tensor(0.1, dtype=DT, requires_grad=True)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, _):
        before = fmodel.fast_params
        history = len(list(fmodel.parameters(time=0)))

        def inner(params: list[Tensor], h: Tensor) -> Tensor:
            out: Tensor = fmodel(x, params=params) * h  # not a scalar: refused after the forward
            return out

        with pytest.raises(ImplicitError, match="inner_loss must return a scalar"):
            hypergrad(inner, inner, fmodel, h)
        assert all(a is b for a, b in zip(fmodel.fast_params, before))
        assert len(list(fmodel.parameters(time=0))) == history


def test_a_solver_of_ones_own() -> None:
    """Any object with solve(matvec, b, *, what) returning a SolveResult is a solver."""

    class Lstsq:
        def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, what: str = "") -> Any:
            a = torch.stack([matvec(e) for e in torch.eye(len(b), dtype=b.dtype)], dim=1)
            x = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
            r = float((b - a @ x).norm())
            return SolveResult(x, True, "converged", 1, len(b), r, r, float(b.norm()), "lstsq")

    p = Ridge()
    result = hypergrad(p.inner, p.outer, p.theta(p.h).detach(), p.h, solver=Lstsq())
    assert rel_err(result.grads[0], p.reference()) < 1e-10
    assert result.solves[0].method == "lstsq"

    class Broken:
        def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, what: str = "") -> Any:
            return b

    with pytest.raises(higher.UsageError, match="must return a SolveResult, got Tensor"):
        hypergrad(p.inner, p.outer, p.theta(p.h).detach(), p.h, solver=Broken())


@pytest.mark.cuda
@pytest.mark.parametrize("solver", [CG(tol=1e-10), Direct()], ids=["cg", "direct"])
def test_cuda_ridge_matches_the_closed_form(solver: LinearSolver) -> None:
    p = Ridge()
    ref = p.reference()
    p.x, p.y, p.xv, p.yv = (t.cuda() for t in (p.x, p.y, p.xv, p.yv))
    p.h = p.h.detach().cuda().requires_grad_()
    result = hypergrad(p.inner, p.outer, p.theta(p.h).detach(), p.h, solver=solver)
    assert result.grads[0].device.type == "cuda" and result.solves[0].converged
    assert rel_err(result.grads[0].cpu(), ref) < 1e-6
