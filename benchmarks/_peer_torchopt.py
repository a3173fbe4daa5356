"""Contender: TorchOpt 0.7.3's object API (`MetaSGD`, `MetaAdam`), as its MAML example uses it.

The module's parameters are stepped in place (replaced by non-leaf tensors) and restored after
each task with `extract_state_dict` / `recover_state_dict`. The per-parameter learning rates
of the HPO workload go through TorchOpt's own extension point: a `GradientTransformation`
given to `MetaOptimizer`.
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
    import torchopt  # type: ignore[import-not-found]

    model = problem.model
    initial: list[torch.Tensor] = list(model.parameters())
    hpo = problem.wrt == "lr"
    n_tasks = len(problem.tasks)
    lrs: list[torch.Tensor] = []  # in TorchOpt's flattening order (keys sorted per module)

    def sgd_per_param(updates: Any, state: Any, *, params: Any = None, inplace: bool = True) -> Any:
        return tuple(-lr * g for lr, g in zip(lrs, updates)), state

    if hpo:
        for p in initial:  # HPO: the weights are data, only the learning rates are learned
            p.requires_grad_(True)
        impl = torchopt.base.GradientTransformation(lambda params: torchopt.base.EmptyState(),
                                                    sgd_per_param)  # fmt: skip
        inner_opt = torchopt.MetaOptimizer(model, impl)
        flat = torchopt.pytree.tree_flatten_as_tuple(inner_opt.param_containers_groups[0])[0]
        position = {id(p): i for i, p in enumerate(initial)}
        lrs.extend(problem.lrs[position[id(t)]] for t in flat)
    elif problem.optimizer == "adam":
        inner_opt = torchopt.MetaAdam(model, lr=problem.lr, betas=problem.betas, eps=problem.eps)
    else:
        inner_opt = torchopt.MetaSGD(model, lr=problem.lr)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
    wrt = problem.lrs if hpo else initial

    def meta_step() -> list[torch.Tensor]:
        total = [torch.zeros_like(w) for w in wrt]
        for xs, ys, xq, yq in problem.tasks:
            for _ in range(problem.steps):
                inner_opt.step(problem.loss(model(xs), ys))
            meta_loss = problem.loss(model(xq), yq) / n_tasks
            grads = torch.autograd.grad(meta_loss, wrt)
            total = [t + g for t, g in zip(total, grads)]
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return total

    return meta_step


if __name__ == "__main__":
    serve("torchopt", build, {"library": f"torchopt {metadata.version('torchopt')}"})
