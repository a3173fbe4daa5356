"""Contender: hand-written `torch.func.functional_call` and `torch.autograd.grad` (the floor).

The update rules are written out per tensor, as a user would: SGD, and Adam exactly as
`torch.optim.Adam` computes it (`denom = sqrt(v) / sqrt(1 - beta2**t) + eps`), which is the
reference the Adam rows' correctness column is measured against.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import MetaStep, Problem, serve


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


def build(problem: Problem) -> MetaStep:
    model = problem.model
    names = [n for n, _ in model.named_parameters()]
    initial: list[torch.Tensor] = list(model.parameters())
    hpo = problem.wrt == "lr"
    wrt = problem.lrs if hpo else initial
    n_tasks = len(problem.tasks)

    def meta_step() -> list[torch.Tensor]:
        total = [torch.zeros_like(w) for w in wrt]
        for xs, ys, xq, yq in problem.tasks:
            params = [p.detach().requires_grad_() for p in initial] if hpo else initial
            m = [torch.zeros_like(p) for p in params]
            v = [torch.zeros_like(p) for p in params]
            for t in range(1, problem.steps + 1):
                out = functional_call(model, dict(zip(names, params)), (xs,))
                grads = torch.autograd.grad(problem.loss(out, ys), params, create_graph=True)
                if problem.optimizer == "adam":
                    params, m, v = adam_step(params, grads, m, v, t, problem)
                elif hpo:
                    params = [p - lr * g for p, g, lr in zip(params, grads, problem.lrs)]
                else:
                    params = [p - problem.lr * g for p, g in zip(params, grads)]
            out = functional_call(model, dict(zip(names, params)), (xq,))
            meta_loss = problem.loss(out, yq) / n_tasks
            total = [a + g for a, g in zip(total, torch.autograd.grad(meta_loss, wrt))]
        return total

    return meta_step


if __name__ == "__main__":
    serve("torch.func", build, {"library": f"torch.func (torch {torch.__version__})"})
