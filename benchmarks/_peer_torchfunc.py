"""Contenders written by hand: `torch.func.functional_call` and `torch.autograd.grad` (the
floor and reference), or with `--variant slots` the weights put in the module's own parameter
slots and the module called (what TorchOpt does, with no library around it: the floor of an
eager library on these workloads).

The update rules are written out per tensor, as a user would: SGD (`torch.add(p, g,
alpha=-lr)` per tensor in the slots variant, as `torch.optim.SGD` computes it), and Adam exactly
as `torch.optim.Adam` computes it (`denom = sqrt(v) / sqrt(1 - beta2**t) + eps`), which is the
reference the Adam rows' correctness column is measured against.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import Mark, MetaStep, Problem, no_mark, serve, worker_args


def adam_step(
    params: list[torch.Tensor],
    grads: tuple[torch.Tensor, ...],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    t: int,
    problem: Problem,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One step of torch.optim.Adam, out of place (no weight decay, no amsgrad)."""
    beta1, beta2 = problem.betas
    bc1, bc2_sqrt = 1 - beta1**t, (1 - beta2**t) ** 0.5
    new_p, new_m, new_v = [], [], []
    for p, g, m_i, v_i in zip(params, grads, m, v):
        m_i = m_i + (g - m_i) * (1 - beta1)
        v_i = v_i * beta2 + (1 - beta2) * g * g
        denom = v_i.sqrt() / bc2_sqrt + problem.eps
        new_p.append(p - (problem.lr / bc1) * (m_i / denom))
        new_m.append(m_i)
        new_v.append(v_i)
    return new_p, new_m, new_v


def build(problem: Problem, slots: bool = False, mark: Mark = no_mark) -> MetaStep:
    """The meta-step of `problem`, hand-written (`slots`: the module's own parameter slots;
    `mark`: see `Mark`)."""
    model = problem.model
    names = [n for n, _ in model.named_parameters()]
    initial: list[torch.Tensor] = list(model.parameters())
    hpo = problem.wrt == "lr"
    wrt = problem.lrs if hpo else initial
    n_tasks = len(problem.tasks)
    owners = [model.get_submodule(n.rpartition(".")[0]) for n in names]
    keys = [n.rpartition(".")[2] for n in names]

    def call(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if not slots:
            return cast(torch.Tensor, functional_call(model, dict(zip(names, params)), (x,)))
        for owner, key, p in zip(owners, keys, params):
            owner._parameters[key] = p  # type: ignore[assignment]  # a plain tensor, as TorchOpt
        return cast(torch.Tensor, model(x))

    def sgd(params: list[torch.Tensor], grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if slots:  # one op per tensor, as torch.optim.SGD's add_(g, alpha=-lr)
            return [torch.add(p, g, alpha=-problem.lr) for p, g in zip(params, grads)]
        return [p - problem.lr * g for p, g in zip(params, grads)]

    def meta_step() -> list[torch.Tensor]:
        total = [torch.zeros_like(w) for w in wrt]
        for xs, ys, xq, yq in problem.tasks:
            params = [p.detach().requires_grad_() for p in initial] if hpo else initial
            m = [torch.zeros_like(p) for p in params]
            v = [torch.zeros_like(p) for p in params]
            mark("setup")
            for t in range(1, problem.steps + 1):
                grads = torch.autograd.grad(
                    problem.loss(call(params, xs), ys), params, create_graph=True
                )
                if problem.optimizer == "adam":
                    params, m, v = adam_step(params, grads, m, v, t, problem)
                elif hpo:
                    params = [p - lr * g for p, g, lr in zip(params, grads, problem.lrs)]
                else:
                    params = sgd(params, grads)
                if t == 1:
                    mark("first step")
            mark("later steps")
            meta_loss = problem.loss(call(params, xq), yq) / n_tasks
            grads = torch.autograd.grad(meta_loss, wrt)
            mark("meta-gradient")
            total = [a + g for a, g in zip(total, grads)]
            mark("exit")
        if slots:  # the module's own parameters back in their slots
            for owner, key, p in zip(owners, keys, initial):
                owner._parameters[key] = p  # type: ignore[assignment]
        return total

    return meta_step


if __name__ == "__main__":
    if worker_args().variant == "slots":
        serve("hand-written loop", lambda problem: build(problem, slots=True),
              {"library": f"hand-written (torch {torch.__version__})"})  # fmt: skip
    else:
        serve("torch.func", build, {"library": f"torch.func (torch {torch.__version__})"})
