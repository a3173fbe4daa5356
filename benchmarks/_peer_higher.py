"""Contender: `higher.innerloop_ctx`, the same user code for this project and higher 0.2.1.

The orchestrator runs this file with the session's Python (this project) and with a venv that
holds higher==0.2.1: the code below is what a user of either writes, unchanged — but for the
per-parameter learning rates of `hpo`, which this project takes as one group's list of tensors
(Meta-SGD) and 0.2.1, which has no such form, as one param group per tensor.

With `--compiled` (this project only) each inner step is `higher.compile_step`'s: one compiled
graph per step, made once per workload and reused by every meta-step after the warm-up. With
`--unroll MODE` (this project only: memory.py) the inner loop runs in that memory mode
("recompute", "recompute-C": every C-th state kept, "truncated-W", "forward"), each step's loss
given as a closure.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import MetaStep, Problem, serve, worker_args

#: workload -> its compiled step (made once, as a user makes it once outside the task loop)
_COMPILED: dict[str, Any] = {}


def _mode(name: str | None) -> Any:
    import higher

    if name is None or name in ("full", "recompute", "forward"):
        return name
    kind, _, number = name.rpartition("-")
    if kind == "recompute":
        return higher.Recompute(every=int(number))
    if kind == "truncated":
        return higher.Truncated(window=int(number))
    raise ValueError(f"unknown memory mode {name!r}")


def build(problem: Problem) -> MetaStep:
    import higher

    unroll = _mode(worker_args().unroll)
    modes = {} if unroll is None else {"unroll": unroll}
    step = None
    if worker_args().compiled:
        if problem.name not in _COMPILED:
            loss = problem.loss
            _COMPILED[problem.name] = higher.compile_step(lambda m, x, y: loss(m(x), y))
        step = _COMPILED[problem.name]

    model, lr = problem.model, problem.lr
    params: list[torch.Tensor] = list(model.parameters())
    hpo = problem.wrt == "lr"
    override: dict[str, list[Any]] | None
    if problem.wrt == "hypers":  # memory.py's -hpo workloads: SGD's four hyperparameters
        h = {k: float(v.detach()) for k, v in problem.hypers.items()}
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, h["lr"], h["momentum"], h["dampening"], h["weight_decay"]
        )
        wrt, override = list(problem.hypers.values()), {k: [v] for k, v in problem.hypers.items()}
    elif hpo and hasattr(higher, "UsageError"):  # this project (0.2.1 has no UsageError)
        # Meta-SGD as its users write it: one group, lr a list of tensors, one per parameter.
        opt = torch.optim.SGD(params, lr=lr)
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
            with higher.innerloop_ctx(
                model, opt, copy_initial_weights=problem.wrt != "init", override=override, **modes
            ) as (fmodel, diffopt):
                for _ in range(problem.steps):
                    if unroll is not None:
                        diffopt.step(closure=lambda: problem.loss(fmodel(xs), ys))  # noqa: B023
                    elif step is None:
                        diffopt.step(problem.loss(fmodel(xs), ys))
                    else:
                        step(fmodel, diffopt, xs, ys)
                meta_loss = problem.loss(fmodel(xq), yq) / n_tasks
                grads = torch.autograd.grad(meta_loss, wrt)
            total = [t + g for t, g in zip(total, grads)]
        return total

    if step is not None:
        meta_step()  # compiles the step (seconds), kept out of every measurement
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
