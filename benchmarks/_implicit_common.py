"""What every contender of `implicit.py` shares: the problems, their solutions, the reference.

Pure torch (the TorchOpt worker imports this module in its own venv). A problem is a
regularized regression whose inner solution is computed here once, in float64 (the closed form
for ridge, Newton's method for logistic regression), cached on disk for the workers, and cast
to the workload's dtype. A contender turns it into a step that returns d outer / d h, the
hypergradient with respect to the log of one L2 penalty per feature; `reference` is the same
hypergradient from the closed-form implicit formula in float64.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: workload -> what it is (the table explains itself with these)
WORKLOADS: dict[str, str] = {
    "ridge-cg": "ridge regression, 2000 features (one log-penalty each), 4000 train / 1000 "
    "validation rows, float64; CG to a relative residual of 1e-10",
    "logistic-cg": "L2-logistic regression, 2000 features (one log-penalty each), 4000 train / "
    "1000 validation rows, float32; CG to a relative residual of 1e-5",
    "ridge-direct": "ridge regression, 300 features, 600 / 150 rows, float64; a dense solve "
    "(this project: Direct; TorchOpt: solve_inv)",
}


@dataclass(frozen=True)
class Spec:
    kind: str  # "ridge" or "logistic"
    features: int
    rows: int
    dtype: torch.dtype
    solver: str  # "cg" or "direct"
    tol: float
    maxiter: int


SPECS = {
    "ridge-cg": Spec("ridge", 2000, 4000, torch.float64, "cg", 1e-10, 1000),
    "logistic-cg": Spec("logistic", 2000, 4000, torch.float32, "cg", 1e-5, 1000),
    "ridge-direct": Spec("ridge", 300, 600, torch.float64, "direct", 1e-10, 2),
}
SMOKE_FEATURES, SMOKE_ROWS = 40, 80


@dataclass
class Problem:
    """One workload: data, the inner solution and the penalties, in the workload's dtype."""

    name: str
    spec: Spec
    x: Tensor
    y: Tensor
    xv: Tensor
    yv: Tensor
    #: log-penalties, one per feature (requires grad: the hyperparameter)
    h: Tensor
    #: the inner solution at h (detached)
    theta: Tensor

    def inner(self, theta: Tensor, h: Tensor) -> Tensor:
        """The training loss plus sum(exp(h) theta²) / 2."""
        return data_loss(self.spec.kind, self.x @ theta, self.y) + (h.exp() * theta**2).sum() / 2

    def outer(self, theta: Tensor, h: Tensor) -> Tensor:
        """The validation loss."""
        return data_loss(self.spec.kind, self.xv @ theta, self.yv)

    def optimality(self, theta: Tensor, h: Tensor) -> Tensor:
        """The gradient of `inner` in theta, by `torch.func.grad` (which TorchOpt's custom_root
        needs: it runs the condition inside `torch.func.vjp`)."""
        grad: Tensor = torch.func.grad(self.inner)(theta, h)
        return grad


def data_loss(kind: str, logits: Tensor, y: Tensor) -> Tensor:
    if kind == "ridge":
        return ((logits - y) ** 2).mean() / 2
    return F.binary_cross_entropy_with_logits(logits, y)


def _data(spec: Spec, smoke: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x, y, xv, yv, h in float64, from seed 0."""
    d, n = (SMOKE_FEATURES, SMOKE_ROWS) if smoke else (spec.features, spec.rows)
    g = torch.Generator().manual_seed(0)
    x, xv = (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(n // 4, d, generator=g, dtype=torch.float64),
    )
    w = torch.randn(d, generator=g, dtype=torch.float64) / d**0.5
    if spec.kind == "ridge":
        y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        yv = xv @ w + 0.5 * torch.randn(n // 4, generator=g, dtype=torch.float64)
        h = torch.empty(d, dtype=torch.float64).uniform_(-3, 0, generator=g)
    else:
        y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
        yv = (torch.rand(n // 4, generator=g, dtype=torch.float64) < torch.sigmoid(xv @ w)).double()
        h = torch.empty(d, dtype=torch.float64).uniform_(-5, -2, generator=g)
    return x, y, xv, yv, h


def _hessian(spec: Spec, x: Tensor, theta: Tensor, lam: Tensor) -> Tensor:
    n = len(x)
    if spec.kind == "ridge":
        return x.T @ x / n + torch.diag(lam)
    s = torch.sigmoid(x @ theta)
    return x.T @ (x * (s * (1 - s)).unsqueeze(1)) / n + torch.diag(lam)


def _solve_inner(spec: Spec, x: Tensor, y: Tensor, h: Tensor) -> Tensor:
    """The inner solution in float64: the closed form, or Newton's method to round-off."""
    lam, n = h.exp(), len(x)
    theta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(1 if spec.kind == "ridge" else 50):
        s = x @ theta if spec.kind == "ridge" else torch.sigmoid(x @ theta)
        grad = x.T @ (s - y) / n + lam * theta
        if float(grad.abs().max()) < 1e-15:
            break
        theta = theta - torch.linalg.solve(_hessian(spec, x, theta, lam), grad)
    return theta


def _cached_solution(name: str, spec: Spec, smoke: bool) -> tuple[Tensor, ...]:
    """The float64 data and solution, computed once per machine and kept for every worker."""
    folder = Path(os.environ.get("HIGHER_BENCH_CACHE", tempfile.gettempdir()))
    path = folder / f"higher-implicit-{name}{'-smoke' if smoke else ''}-v1.pt"
    if path.exists():
        loaded: tuple[Tensor, ...] = tuple(torch.load(path))
        return loaded
    x, y, xv, yv, h = _data(spec, smoke)
    theta = _solve_inner(spec, x, y, h)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save([x, y, xv, yv, h, theta], partial)
    partial.replace(path)  # atomic: a concurrent worker sees all or nothing
    return x, y, xv, yv, h, theta


def make(name: str, smoke: bool, device: str, dtype: torch.dtype | None = None) -> Problem:
    """Workload `name` on `device` in its own dtype (`dtype` is ignored: each workload has one)."""
    if name not in SPECS:
        raise ValueError(f"unknown workload {name!r}: expected one of {list(SPECS)}")
    spec = SPECS[name]
    x, y, xv, yv, h, theta = (t.to(device, spec.dtype) for t in _cached_solution(name, spec, smoke))
    return Problem(name, spec, x, y, xv, yv, h.requires_grad_(), theta)


def reference(name: str, smoke: bool) -> Tensor:
    """d outer / d h in float64 by the closed-form implicit formula: with A the Hessian of the
    inner loss, d theta / d h_j = -A⁻¹ e_j lam_j theta_j, so d outer / d h = -lam * theta *
    A⁻¹ grad outer."""
    spec = SPECS[name]
    x, _, xv, yv, h, theta = _cached_solution(name, spec, smoke)
    lam = h.exp()
    s = xv @ theta if spec.kind == "ridge" else torch.sigmoid(xv @ theta)
    grad_outer = xv.T @ (s - yv) / len(xv)
    solved: Tensor = torch.linalg.solve(_hessian(spec, x, theta, lam), grad_outer)
    return -lam * theta * solved
