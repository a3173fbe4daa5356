"""`Lion`: the optimizer of Chen et al., "Symbolic Discovery of Optimization Algorithms" (2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Lion(torch.optim.Optimizer):
    """Lion (EvoLved Sign Momentum): a step of size `lr` along the sign of an interpolated
    momentum, with decoupled weight decay.

    For each parameter `p` with gradient `g` (`-g` with `maximize=True`) and momentum `m`:

        c = beta1 * m + (1 - beta1) * g
        p = p * (1 - lr * weight_decay) - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    Its steps have the same size in every coordinate, so it wants a smaller `lr` (3-10x) and
    a larger `weight_decay` than AdamW.

    Args:
        params: parameters or param-group dicts.
        lr: the step size.
        betas: `(beta1, beta2)`: the interpolation of the update, the decay of the momentum.
        weight_decay: decoupled weight decay, multiplied by `lr`.
        maximize: ascend the objective instead.

    Examples:
        >>> import torch
        >>> from higher_lion import Lion
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = Lion([w], lr=0.1)
        >>> (w**2).sum().backward()
        >>> opt.step()
        >>> w.tolist()
        [0.8999999761581421, -0.8999999761581421]
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas}; expected two values in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one step; `closure` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                direction = (exp_avg * beta1 + grad * (1 - beta1)).sign_()
                p.mul_(1 - lr * decay)
                p.add_(direction, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad * (1 - beta2))
        return loss
