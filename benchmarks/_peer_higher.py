"""Contender: `higher.innerloop_ctx`, the same user code for this project and higher 0.2.1.

The orchestrator runs this file with the session's Python (this project) and with a venv that
holds higher==0.2.1: the code below is what a user of either writes, unchanged — but for the
per-parameter learning rates of `hpo`, which this project takes as one group's list of tensors
(Meta-SGD) and 0.2.1, which has no such form, as one param group per tensor.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import MetaStep, Problem, serve


def build(problem: Problem) -> MetaStep:
    import higher

    model, lr = problem.model, problem.lr
    params: list[torch.Tensor] = list(model.parameters())
    hpo = problem.wrt == "lr"
    override: dict[str, list[Any]] | None
    if hpo and hasattr(higher, "UsageError"):  # this project (0.2.1 has no UsageError)
        # Meta-SGD as its users write it: one group, lr a list of tensors, one per parameter.
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
        wrt, override = problem.lrs, {"lr": [problem.lrs]}
    elif hpo:  # higher 0.2.1: one param group per tensor, its lr overridden by a tensor
        opt = torch.optim.SGD([{"params": [p]} for p in params], lr=lr)
        wrt, override = problem.lrs, {"lr": problem.lrs}
    elif problem.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=problem.betas, eps=problem.eps)
        wrt, override = params, None
    else:
        opt = torch.optim.SGD(params, lr=lr)
        wrt, override = params, None
    n_tasks = len(problem.tasks)

    def meta_step() -> list[torch.Tensor]:
        total = [torch.zeros_like(w) for w in wrt]
        for xs, ys, xq, yq in problem.tasks:
            with higher.innerloop_ctx(model, opt, copy_initial_weights=hpo, override=override) as (
                fmodel,
                diffopt,
            ):
                for _ in range(problem.steps):
                    diffopt.step(problem.loss(fmodel(xs), ys))
                meta_loss = problem.loss(fmodel(xq), yq) / n_tasks
                grads = torch.autograd.grad(meta_loss, wrt)
            total = [t + g for t, g in zip(total, grads)]
        return total

    return meta_step


def _version() -> dict[str, str]:
    for dist in ("higher-core", "higher"):
        try:
            return {"library": f"{dist} {metadata.version(dist)}"}
        except metadata.PackageNotFoundError:
            continue
    return {"library": "higher (unknown version)"}


if __name__ == "__main__":
    serve("higher", build, _version())
