"""`DifferentiableLion`: Lion's step as a pure `Rule`, so an unrolled loop can be differentiated.

Written with `higher.optim.rule`, the toolkit the built-in twins use: the twin gets the object
API, fused kernels over many tensors, option and type checks, learnable and per-parameter
learning rates and `higher.compile_step`, from `LION` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

import higher.optim
from higher.optim.rule import Hyper, Rule, elementwise, flag, some, split_lr

T = torch.Tensor


class LionState(NamedTuple):
    """One momentum (`exp_avg`, as `Lion` names it in its state) per parameter."""

    exp_avg: list[T]


def lion_init(params: Sequence[T], hyper: Hyper) -> LionState:
    """Zero momentum, as `Lion` starts."""
    return LionState([torch.zeros_like(p, memory_format=torch.preserve_format) for p in params])


def lion_update(
    params: Sequence[T], grads: Sequence[T], state: LionState, hyper: Hyper
) -> tuple[list[T], LionState]:
    """One step of `Lion`, out of place; every hyperparameter may be a tensor that requires
    grad. The sign has a zero derivative, so hypergradients flow through the decay, the step
    size and the momentum.

    Examples:
        >>> import torch
        >>> from higher_lion import LION
        >>> grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
        >>> hyper = {"lr": 0.5, "betas": (0.9, 0.99), "weight_decay": 0.0}
        >>> (p,), state = LION.update([torch.ones(2, dtype=torch.float64)], [grad],
        ...                           LION.init([grad], hyper), hyper)
        >>> p.tolist(), [round(v, 12) for v in state.exp_avg[0].tolist()]
        ([0.5, 1.5], [0.005, -0.005])
    """
    lr, lrs = split_lr(hyper)
    beta1, beta2 = hyper["betas"]
    decay, maximize = hyper["weight_decay"], flag(LION, hyper, "maximize")

    def kernel(p: T, g: T, m: T, lr_t: T | None) -> tuple[T, T]:
        step = lr if lr_t is None else lr_t
        g = -g if maximize else g
        direction = torch.sign(m * beta1 + g * (1 - beta1))
        return p * (1 - step * decay) - step * direction, m * beta2 + g * (1 - beta2)

    new_params, momenta = elementwise(kernel, params, grads, state.exp_avg, lrs)
    return some(new_params), LionState(some(momenta))


LION = Rule(
    name="Lion",
    state_type=LionState,
    init=lion_init,
    update=lion_update,
    hypers=("lr", "weight_decay"),
    pairs=("betas",),
    flags={"maximize": False},
)


class DifferentiableLion(higher.optim.RuleOptimizer):
    """The differentiable twin of `higher_lion.Lion`, found by `higher` through the entry point
    `higher.optimizers` (no `register_optim` call needed).

    Examples:
        >>> import torch, higher.optim
        >>> from higher_lion import Lion, DifferentiableLion
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> diffopt = higher.optim.get_diff_optim(Lion([w], lr=0.1), [w])
        >>> isinstance(diffopt, DifferentiableLion), diffopt.step(w.sum(), params=[w])[0].item()
        (True, 0.8999999761581421)
    """

    rule = LION
