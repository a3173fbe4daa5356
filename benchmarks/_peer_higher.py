"""Contender: `higher.innerloop_ctx`, the same user code for this project and higher 0.2.1.

The orchestrator runs this file with the session's Python (this project) and with a venv that
holds higher==0.2.1: the code below is what a user of either writes, unchanged — but for the
per-parameter learning rates of `hpo`, which this project takes as one group's list of tensors
(Meta-SGD) and 0.2.1, which has no such form, as one param group per tensor.

With `--compiled` (this project only) each inner step is `higher.compile_step`'s: one compiled
graph per step, made once per workload and reused by every meta-step after the warm-up. With
`--unroll MODE` (this project only: memory.py) the inner loop runs in that memory mode
("recompute", "recompute-C": every C-th state kept, "truncated-W", "forward"), each step's loss
given as a closure. With `--batched` the tasks run at once: `higher.batched_innerloop_ctx` (vmap
over tasks), the same loop over stacked task data. With `--meta-step` the whole meta-step is one
compiled graph (`higher.compile_meta_step`, tasks vmapped inside it), made once per workload.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import Mark, MetaStep, Problem, no_mark, serve, worker_args

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


def build(problem: Problem, mark: Mark = no_mark) -> MetaStep:
    """The meta-step of `problem` under `innerloop_ctx` (`mark`: see `Mark`; eager loops)."""
    import higher

    args = worker_args()
    if args.batched:
        return _batched(problem)
    if args.meta_step:
        return _meta_step(problem, args.backend)
    unroll = _mode(args.unroll)
    modes = {} if unroll is None else {"unroll": unroll}
    step = None
    if args.compiled:
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
                mark("setup")
                for k in range(problem.steps):
                    if unroll is not None:
                        diffopt.step(closure=lambda: problem.loss(fmodel(xs), ys))  # noqa: B023
                    elif step is None:
                        diffopt.step(problem.loss(fmodel(xs), ys))
                    else:
                        step(fmodel, diffopt, xs, ys)
                    if k == 0:
                        mark("first step")
                mark("later steps")
                meta_loss = problem.loss(fmodel(xq), yq) / n_tasks
                grads = torch.autograd.grad(meta_loss, wrt)
                mark("meta-gradient")
            total = [t + g for t, g in zip(total, grads)]
            mark("exit")
        return total

    if step is not None:
        meta_step()  # compiles the step (seconds), kept out of every measurement
    return meta_step


def _optimizer(problem: Problem) -> tuple[torch.optim.Optimizer, list[torch.Tensor], Any]:
    """This project's optimizer for `problem`, what the meta-gradient is taken of, override."""
    params: list[torch.Tensor] = list(problem.model.parameters())
    if problem.wrt == "lr":  # Meta-SGD: one group, lr a list of tensors, one per parameter
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=problem.lr)
        return opt, problem.lrs, {"lr": [problem.lrs]}
    if problem.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=problem.lr, betas=problem.betas, eps=problem.eps)
        return opt, params, None
    return torch.optim.SGD(params, lr=problem.lr), params, None


def _stacked(problem: Problem) -> list[torch.Tensor]:
    """The tasks' (support x, support y, query x, query y), each stacked over tasks."""
    return [torch.stack(parts) for parts in zip(*problem.tasks)]


def _batched(problem: Problem) -> MetaStep:
    """Every task at once: batched_innerloop_ctx, the per-task losses from torch.vmap."""
    import higher

    model, loss = problem.model, torch.vmap(problem.loss)
    opt, wrt, override = _optimizer(problem)
    hpo = problem.wrt == "lr"
    xs, ys, xq, yq = _stacked(problem)
    n_tasks = len(problem.tasks)

    def meta_step() -> list[torch.Tensor]:
        with higher.batched_innerloop_ctx(
            model, opt, tasks=n_tasks, copy_initial_weights=hpo, override=override
        ) as (fmodel, diffopt):
            for _ in range(problem.steps):
                diffopt.step(loss(fmodel(xs), ys))
            meta_loss = loss(fmodel(xq), yq).sum() / n_tasks
            return list(torch.autograd.grad(meta_loss, wrt))

    return meta_step


def _meta_step(problem: Problem, backend: str) -> MetaStep:
    """The whole meta-step compiled: compile_meta_step, tasks vmapped inside the graph."""
    import higher

    loss = problem.loss

    def inner(m: Any, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
              yq: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return loss(m(xs), ys)

    def outer(m: Any, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
              yq: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return loss(m(xq), yq)

    n_tasks = len(problem.tasks)
    tasks = n_tasks if n_tasks > 1 else None
    batch = _stacked(problem) if tasks else list(problem.tasks[0])
    meta = higher.compile_meta_step(inner, outer, steps=problem.steps, tasks=tasks,
                                    backend=backend)  # fmt: skip
    opt, wrt, override = _optimizer(problem)

    def meta_step() -> list[torch.Tensor]:
        meta_loss = meta(problem.model, opt, *batch, override=override).sum() / n_tasks
        return list(torch.autograd.grad(meta_loss, wrt))

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
