"""NAdam, RAdam and Adamax as pure rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ._kernel import elementwise, is_zero, some, sqrt0
from ._rule import Hyper, Rule, flag, split_lr

T = torch.Tensor


def _zeros(params: Sequence[T]) -> list[T]:
    return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]


def scalar_dtype() -> torch.dtype:
    """The dtype torch keeps its scalar state in (`step`, `mu_product`, `eta`, `mu`)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _decay(p: T, g: T, lr: Any, wd: Any, decoupled: bool) -> tuple[T, T]:
    if is_zero(wd):
        return p, g
    if decoupled:
        return p * (1 - lr * wd), g
    return p, g + wd * p


class NAdamState(NamedTuple):
    """Step count, the running product of momentum coefficients, and the moments."""

    step: int
    mu_product: T
    exp_avg: list[T]
    exp_avg_sq: list[T]


def nadam_init(params: Sequence[T], hyper: Hyper) -> NAdamState:
    """Zero moments, `mu_product` 1, at step 0."""
    return NAdamState(0, torch.ones((), dtype=scalar_dtype()), _zeros(params), _zeros(params))


def nadam_update(
    params: Sequence[T], grads: Sequence[T], state: NAdamState, hyper: Hyper
) -> tuple[list[T], NAdamState]:
    """One step of `torch.optim.NAdam`, out of place."""
    lr, lrs = split_lr(hyper)
    beta1, beta2 = hyper["betas"][0], hyper["betas"][1]
    wd, eps, momentum_decay = hyper["weight_decay"], hyper["eps"], hyper["momentum_decay"]
    maximize = flag(NADAM, hyper, "maximize")
    decoupled = flag(NADAM, hyper, "decoupled_weight_decay")
    step = state.step + 1
    bias_correction2 = 1 - beta2**step
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # torch keeps mu_product in its scalar dtype and reads it back as a Python float (float64)
    dtype = state.mu_product.dtype
    factor = mu
    if isinstance(mu, T) and not any(isinstance(h, T) for h in (beta1, momentum_decay)):
        # a count that is a tensor (a compiled loop's) must not change the arithmetic: torch's
        # mu is then a Python float, which multiplies mu_product in mu_product's dtype
        factor = mu.to(dtype)
    mu_product = (state.mu_product * factor).to(dtype)
    mu_product64 = mu_product.to(torch.float64)
    mu_product_next = mu_product64 * mu_next

    def kernel(p: T, g: T, m: T, v: T, lr_t: T | None) -> tuple[T, T, T]:
        step_lr = lr if lr_t is None else lr_t
        g = -g if maximize else g
        p, g = _decay(p, g, step_lr, wd, decoupled)
        m = m + (g - m) * (1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        denom = sqrt0(v / bias_correction2) + eps
        p = p + (-step_lr * (1.0 - mu) / (1.0 - mu_product64)) * (g / denom)
        p = p + ((-step_lr * mu_next) / (1.0 - mu_product_next)) * (m / denom)
        return p, m, v

    new_p, m, v = elementwise(kernel, params, grads, state.exp_avg, state.exp_avg_sq, lrs)
    return some(new_p), NAdamState(step, mu_product, some(m), some(v))


NADAM = Rule(
    name="NAdam",
    state_type=NAdamState,
    init=nadam_init,
    update=nadam_update,
    hypers=("lr", "eps", "weight_decay", "momentum_decay"),
    pairs=("betas",),
    flags={"maximize": False, "decoupled_weight_decay": False},
    scalar_state=("mu_product",),
    # beta1 and momentum_decay make mu_product, one value for all the parameters
    per_element=("lr", "eps", "weight_decay"),
)


class RAdamState(NamedTuple):
    """Step count and moments."""

    step: int
    exp_avg: list[T]
    exp_avg_sq: list[T]


def radam_init(params: Sequence[T], hyper: Hyper) -> RAdamState:
    """Zero moments at step 0."""
    return RAdamState(0, _zeros(params), _zeros(params))


def radam_update(
    params: Sequence[T], grads: Sequence[T], state: RAdamState, hyper: Hyper
) -> tuple[list[T], RAdamState]:
    """One step of `torch.optim.RAdam`, out of place."""
    lr, lrs = split_lr(hyper)
    beta1, beta2 = hyper["betas"][0], hyper["betas"][1]
    wd, eps = hyper["weight_decay"], hyper["eps"]
    maximize = flag(RADAM, hyper, "maximize")
    decoupled = flag(RADAM, hyper, "decoupled_weight_decay")
    step = state.step + 1
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    # a tensor step count (a compiled loop's) cannot choose a branch: both, chosen by where
    count: object = step  # an int to the type checker; a tensor inside a compiled loop
    where: T | None = rho_t > 5.0 if isinstance(count, T) else None
    rectified = where is not None or bool(rho_t > 5.0)
    if where is not None:  # the other branch's inputs made harmless: its gradient 0, not NaN
        rho_t = torch.where(where, rho_t, 6.0)
        rho_inf = torch.where(where, torch.as_tensor(rho_inf, dtype=rho_t.dtype), 7.0)
    rect = (
        ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        if rectified
        else 1.0
    )

    def kernel(p: T, g: T, m: T, v: T, lr_t: T | None) -> tuple[T, T, T]:
        step_lr = lr if lr_t is None else lr_t
        g = -g if maximize else g
        p, g = _decay(p, g, step_lr, wd, decoupled)
        m = m + (g - m) * (1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        corrected = m / bias_correction1
        if not rectified:
            return p - corrected * step_lr, m, v
        adaptive_lr = (bias_correction2**0.5) / (sqrt0(v) + eps)
        if where is None:
            return p - corrected * step_lr * adaptive_lr * rect, m, v
        scaled = corrected * step_lr
        return p - torch.where(where, scaled * adaptive_lr * rect, scaled), m, v

    new_p, m, v = elementwise(kernel, params, grads, state.exp_avg, state.exp_avg_sq, lrs)
    return some(new_p), RAdamState(step, some(m), some(v))


RADAM = Rule(
    name="RAdam",
    state_type=RAdamState,
    init=radam_init,
    update=radam_update,
    hypers=("lr", "eps", "weight_decay"),
    pairs=("betas",),
    flags={"maximize": False, "decoupled_weight_decay": False},
    per_element=("lr", "eps", "weight_decay"),  # beta2 decides whether the step is rectified
)


class AdamaxState(NamedTuple):
    """Step count, first moment and exponentially weighted infinity norm."""

    step: int
    exp_avg: list[T]
    exp_inf: list[T]


def adamax_init(params: Sequence[T], hyper: Hyper) -> AdamaxState:
    """Zero moments at step 0."""
    return AdamaxState(0, _zeros(params), _zeros(params))


def adamax_update(
    params: Sequence[T], grads: Sequence[T], state: AdamaxState, hyper: Hyper
) -> tuple[list[T], AdamaxState]:
    """One step of `torch.optim.Adamax`, out of place."""
    lr, lrs = split_lr(hyper)
    beta1, beta2 = hyper["betas"][0], hyper["betas"][1]
    wd, eps = hyper["weight_decay"], hyper["eps"]
    maximize = flag(ADAMAX, hyper, "maximize")
    step = state.step + 1
    bias_correction = 1 - beta1**step

    def kernel(p: T, g: T, m: T, u: T, lr_t: T | None) -> tuple[T, T, T]:
        step_lr = lr if lr_t is None else lr_t
        g = -g if maximize else g
        p, g = _decay(p, g, step_lr, wd, False)
        m = m + (g - m) * (1 - beta1)
        u = torch.maximum(u * beta2, g.abs() + eps)
        return p - (step_lr / bias_correction) * (m / u), m, u

    new_p, m, u = elementwise(kernel, params, grads, state.exp_avg, state.exp_inf, lrs)
    return some(new_p), AdamaxState(step, some(m), some(u))


ADAMAX = Rule(
    name="Adamax",
    state_type=AdamaxState,
    init=adamax_init,
    update=adamax_update,
    hypers=("lr", "eps", "weight_decay"),
    pairs=("betas",),
    flags={"maximize": False},
    per_element=("lr", "eps", "weight_decay", "betas"),
)
