"""Contender of `implicit.py`: this project's `higher.implicit`, as `hypergrad` (the solution
handed over) or as the `custom_root` decorator (`--variant custom_root`), same solver options."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import higher
from higher.implicit import CG, Direct, LinearSolver, custom_root, hypergrad

sys.path.insert(0, str(Path(__file__).parent))
from _implicit_common import Problem, make
from _peers_common import MetaStep, serve_problems, worker_args


def solver_of(problem: Problem) -> LinearSolver:
    spec = problem.spec
    if spec.solver == "cg":
        return CG(tol=spec.tol, maxiter=spec.maxiter)
    return Direct(tol=spec.tol, maxiter=spec.maxiter)


def build(problem: Problem, variant: str) -> MetaStep:
    solver = solver_of(problem)
    if variant == "hypergrad":

        def step() -> list[torch.Tensor]:
            return hypergrad(problem.inner, problem.outer, problem.theta, problem.h,
                             solver=solver).grads  # fmt: skip

        return step

    @custom_root(problem.optimality, solver=solver)
    def solve(theta0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return problem.theta  # found beforehand, as for every contender

    def root_step() -> list[torch.Tensor]:
        theta = solve(torch.zeros_like(problem.theta), problem.h)
        return list(torch.autograd.grad(problem.outer(theta, problem.h), problem.h))

    return root_step


if __name__ == "__main__":
    variant = worker_args().variant or "hypergrad"
    serve_problems(
        make, lambda problem: build(problem, variant), {"library": f"higher {higher.__version__}"}
    )
