"""Adam and AdamW (amsgrad, decoupled weight decay, maximize) as a pure rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._kernel import elementwise, is_zero, some, sqrt0
from ._rule import Hyper, Rule, flag, split_lr

T = torch.Tensor


class AdamState(NamedTuple):
    """Step count and moments; `max_exp_avg_sq` only with amsgrad."""

    step: int
    exp_avg: list[T]
    exp_avg_sq: list[T]
    max_exp_avg_sq: list[T] | None


def _zeros(params: Sequence[T]) -> list[T]:
    return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]


def adam_init(params: Sequence[T], hyper: Hyper) -> AdamState:
    """Zero moments at step 0."""
    amsgrad = bool(hyper.get("amsgrad", False))
    return AdamState(0, _zeros(params), _zeros(params), _zeros(params) if amsgrad else None)


def _adam_update(
    rule: Rule, params: Sequence[T], grads: Sequence[T], state: AdamState, hyper: Hyper
) -> tuple[list[T], AdamState]:
    lr, lrs = split_lr(hyper)
    beta1, beta2 = hyper["betas"][0], hyper["betas"][1]
    wd, eps = hyper["weight_decay"], hyper["eps"]
    amsgrad, maximize = flag(rule, hyper, "amsgrad"), flag(rule, hyper, "maximize")
    decoupled = flag(rule, hyper, "decoupled_weight_decay")
    step = state.step + 1
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5

    def kernel(p: T, g: T, m: T, v: T, vmax: T | None, lr_t: T | None) -> tuple[T, T, T, T | None]:
        step_lr = lr if lr_t is None else lr_t
        g = -g if maximize else g
        if not is_zero(wd):
            if decoupled:
                p = p * (1 - step_lr * wd)
            else:
                g = g + wd * p
        # torch.optim's own ops (lerp, addcmul, addcdiv) where the coefficients are numbers:
        # the same values, and fewer autograd nodes per step than the same formula spelled out
        if isinstance(beta1, torch.Tensor):
            m = m + (g - m) * (1 - beta1)
        else:
            m = torch.lerp(m, g, 1 - beta1)
        if isinstance(beta2, torch.Tensor):
            v = v * beta2 + (1 - beta2) * g * g
        else:
            v = torch.addcmul(v * beta2, g, g, value=1 - beta2)
        if amsgrad:
            vmax = v if vmax is None else torch.maximum(vmax, v)
            denom = sqrt0(vmax) / bias_correction2_sqrt + eps
        else:
            denom = sqrt0(v) / bias_correction2_sqrt + eps
        step_size = step_lr / bias_correction1
        if not isinstance(step_size, (int, float)):  # a learned learning rate, or betas
            return p - step_size * (m / denom), m, v, vmax
        return torch.addcdiv(p, m, denom, value=-step_size), m, v, vmax

    lists = elementwise(
        kernel,
        params,
        grads,
        state.exp_avg,
        state.exp_avg_sq,
        state.max_exp_avg_sq,
        lrs,
        foreach=True,
    )
    new_p, m, v, vmax = lists
    return some(new_p), AdamState(step, some(m), some(v), some(vmax) if amsgrad else None)


def adam_update(
    params: Sequence[T], grads: Sequence[T], state: AdamState, hyper: Hyper
) -> tuple[list[T], AdamState]:
    """One step of `torch.optim.Adam`, out of place."""
    return _adam_update(ADAM, params, grads, state, hyper)


def adamw_update(
    params: Sequence[T], grads: Sequence[T], state: AdamState, hyper: Hyper
) -> tuple[list[T], AdamState]:
    """One step of `torch.optim.AdamW` (Adam with decoupled weight decay), out of place."""
    return _adam_update(ADAMW, params, grads, state, hyper)


_ADAM_HYPERS = ("lr", "eps", "weight_decay")
ADAM = Rule(
    name="Adam",
    state_type=AdamState,
    init=adam_init,
    update=adam_update,
    hypers=_ADAM_HYPERS,
    pairs=("betas",),
    flags={"amsgrad": False, "maximize": False, "decoupled_weight_decay": False},
    per_element=(*_ADAM_HYPERS, "betas"),
)
ADAMW = ADAM._replace(
    name="AdamW",
    update=adamw_update,
    flags={"amsgrad": False, "maximize": False, "decoupled_weight_decay": True},
)
