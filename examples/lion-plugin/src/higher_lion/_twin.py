"""`DifferentiableLion`: Lion's step out of place, so an unrolled loop can be differentiated."""

from __future__ import annotations

from typing import Any

import torch

import higher.optim

_OPTIONS = frozenset({"lr", "betas", "weight_decay", "maximize"})


def lion_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    betas: tuple[float | torch.Tensor, float | torch.Tensor],
    weight_decay: float | torch.Tensor = 0.0,
    maximize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lion step of one parameter as a pure function: `(new_param, new_exp_avg)`.

    Nothing is modified in place; every hyperparameter may be a tensor that requires grad. The
    sign has a zero derivative, so hypergradients flow through the decay and the step size.

    Example:
        >>> import torch
        >>> from higher_lion import lion_step
        >>> grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
        >>> p, m = lion_step(torch.ones_like(grad), grad, torch.zeros_like(grad), lr=0.5,
        ...                  betas=(0.9, 0.99))
        >>> p.tolist(), [round(v, 12) for v in m.tolist()]
        ([0.5, 1.5], [0.005, -0.005])
    """
    if maximize:
        grad = -grad
    beta1, beta2 = betas
    direction = torch.sign(exp_avg * beta1 + grad * (1 - beta1))
    new_param = param * (1 - lr * weight_decay) - lr * direction
    return new_param, exp_avg * beta2 + grad * (1 - beta2)


class DifferentiableLion(higher.optim.DifferentiableOptimizer):
    """The differentiable twin of `higher_lion.Lion`, found by `higher` through the entry point
    `higher.optimizers` (no `register_optim` call needed).

    Example:
        >>> import torch, higher.optim
        >>> from higher_lion import Lion, DifferentiableLion
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> diffopt = higher.optim.get_diff_optim(Lion([w], lr=0.1), [w])
        >>> isinstance(diffopt, DifferentiableLion), diffopt.step(w.sum(), params=[w])[0].item()
        (True, 0.8999999761581421)
    """

    def _check_options(self, other: torch.optim.Optimizer) -> None:
        for g, group in enumerate(other.param_groups):
            unknown = sorted(set(group) - _OPTIONS - {"params"})
            if unknown:
                raise higher.optim.UnsupportedOptionError(
                    f"param group {g} of the {type(other).__name__} has options {unknown} that "
                    f"DifferentiableLion does not honour (it honours {sorted(_OPTIONS)})"
                )

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        if kwargs:
            raise higher.optim.HyperparameterTypeError(
                f"DifferentiableLion.step() got unexpected keyword arguments {sorted(kwargs)}"
            )
        for g, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for j, grad in enumerate(grads):
                if grad is None:
                    continue
                param, state = group["params"][j], self.state[g][j]
                exp_avg = state.get("exp_avg")
                if exp_avg is None:
                    exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
                group["params"][j], state["exp_avg"] = lion_step(
                    param,
                    grad,
                    exp_avg,
                    lr=group["lr"],
                    betas=group["betas"],
                    weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                )
