"""Contender of `implicit.py`: TorchOpt 0.7.3's `torchopt.diff.implicit.custom_root`, with the
linear solver matching this project's (`solve_cg`, or `solve_inv` for a dense solve), or with
its default `solve_normal_cg` (`--variant normal`)."""

from __future__ import annotations

import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _implicit_common import Problem, make
from _peers_common import MetaStep, serve_problems, worker_args

# TorchOpt 0.7.3 calls functorch.vjp and .jacfwd, which torch 2.13 flags as deprecated each call.
warnings.filterwarnings("ignore", message=".*`functorch\\.", category=FutureWarning)


def build(problem: Problem, variant: str) -> MetaStep:
    import torchopt  # type: ignore[import-not-found]

    spec = problem.spec
    solve: Any
    if variant == "normal":
        solve = torchopt.linear_solve.solve_normal_cg(rtol=spec.tol, maxiter=spec.maxiter)
    elif spec.solver == "cg":
        solve = torchopt.linear_solve.solve_cg(rtol=spec.tol, maxiter=spec.maxiter)
    else:
        solve = torchopt.linear_solve.solve_inv()

    @torchopt.diff.implicit.custom_root(problem.optimality, argnums=1, solve=solve)  # type: ignore[untyped-decorator]
    def solver(theta0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return problem.theta.clone()  # found beforehand, as for every contender

    def step() -> list[torch.Tensor]:
        theta = solver(torch.zeros_like(problem.theta), problem.h)
        return list(torch.autograd.grad(problem.outer(theta, problem.h), problem.h))

    return step


if __name__ == "__main__":
    variant = worker_args().variant or "same"
    library = {"library": f"torchopt {metadata.version('torchopt')}"}
    serve_problems(make, lambda problem: build(problem, variant), library)
