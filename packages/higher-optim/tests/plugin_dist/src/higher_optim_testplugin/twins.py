"""The differentiable twin of Lion: the 0.2.1 recipe (`_update`, out of place), nothing more."""

from __future__ import annotations

from typing import Any

import torch

from higher.optim import DifferentiableOptimizer


class DifferentiableLion(DifferentiableOptimizer):
    """Differentiable Lion, step for step equal to `higher_optim_testplugin.optimizers.Lion`."""

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        for g, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            beta1, beta2 = group["betas"]
            for i, (p, grad) in enumerate(zip(group["params"], grads, strict=True)):
                if grad is None:
                    continue
                state = self.state[g][i]
                m = state.get("exp_avg", torch.zeros_like(p))
                p = p * (1 - group["lr"] * group["weight_decay"])
                group["params"][i] = p - group["lr"] * torch.sign(m * beta1 + grad * (1 - beta1))
                state["exp_avg"] = m * beta2 + grad * (1 - beta2)
