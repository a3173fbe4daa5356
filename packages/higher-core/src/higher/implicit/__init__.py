"""Implicit differentiation: hypergradients at the inner optimum, without the unroll.

When the inner problem is solved to (near) convergence — hyperparameter optimization of a
regularizer, iMAML, data reweighting — the implicit function theorem gives the hypergradient from
the solution alone, at the cost of a linear solve with Hessian-vector products: memory and time
no longer grow with the number of inner steps, and the answer does not depend on the path.

- `hypergrad(inner_loss, outer_loss, params, hyper)`: solve the inner problem however you like,
  then ask for d outer / d hyper at the solution; `hypergrad_batch` for a batch of tasks.
- `custom_root(optimality_fn)`: a decorator (as in TorchOpt and JAXopt) that makes a solver's
  output differentiable through its optimality condition.
- Linear solvers `CG`, `Neumann`, `Direct`, each with `tol`/`maxiter`, a `SolveResult`, and
  `on_fail="warn"|"raise"`: a non-converged solve is never silent.
- The point is checked: a solution that is not stationary (`Stationarity`, `stationarity_tol`)
  warns with `NotStationaryWarning` or raises `NotStationaryError`; NaN or inf anywhere give a
  NaN hypergradient, never a finite one.

What lives where: `_solve.py` owns the hypergradient (`hypergrad`, `hypergrad_batch`,
`custom_root`), its records (`Hypergrad`, `Task`, `Stationarity`) and the stationarity errors;
`_linsolve.py` owns the linear solvers (`CG`, `Neumann`, `Direct`), `SolveResult` and the
convergence errors. `ImplicitError`, the base of this package's errors, is core's (`_errors.py`).

Examples:
    >>> import torch, higher
    >>> lam = torch.tensor(1.0, requires_grad=True)
    >>> theta = torch.tensor(0.5)  # the minimizer of (θ - 1)²/2 + λθ²/2 at λ = 1
    >>> inner = lambda theta, lam: (theta - 1) ** 2 / 2 + lam * theta**2 / 2
    >>> higher.implicit.hypergrad(inner, lambda theta, lam: theta, theta, lam).grads[0].item()
    -0.25
"""

from higher._errors import ImplicitError as ImplicitError
from higher.implicit._linsolve import CG as CG
from higher.implicit._linsolve import ConvergenceError as ConvergenceError
from higher.implicit._linsolve import ConvergenceWarning as ConvergenceWarning
from higher.implicit._linsolve import Direct as Direct
from higher.implicit._linsolve import LinearSolver as LinearSolver
from higher.implicit._linsolve import Neumann as Neumann
from higher.implicit._linsolve import SolveResult as SolveResult
from higher.implicit._solve import Hypergrad as Hypergrad
from higher.implicit._solve import NotStationaryError as NotStationaryError
from higher.implicit._solve import NotStationaryWarning as NotStationaryWarning
from higher.implicit._solve import Stationarity as Stationarity
from higher.implicit._solve import Task as Task
from higher.implicit._solve import custom_root as custom_root
from higher.implicit._solve import hypergrad as hypergrad
from higher.implicit._solve import hypergrad_batch as hypergrad_batch

__all__ = [
    "hypergrad",
    "hypergrad_batch",
    "custom_root",
    "Hypergrad",
    "Task",
    "Stationarity",
    "CG",
    "Neumann",
    "Direct",
    "LinearSolver",
    "SolveResult",
    "ImplicitError",
    "ConvergenceError",
    "ConvergenceWarning",
    "NotStationaryError",
    "NotStationaryWarning",
]
