"""Adagrad, Adadelta and RMSprop as pure rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._kernel import elementwise, is_zero, some, sqrt0
from ._rule import Hyper, Rule, flag, split_lr

T = torch.Tensor


def _zeros(params: Sequence[T]) -> list[T]:
    return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]


class AdagradState(NamedTuple):
    """Step count and the running sum of squared gradients (`sum`, as torch names it)."""

    step: int
    sum: list[T]


def adagrad_init(params: Sequence[T], hyper: Hyper) -> AdagradState:
    """Sums start at `initial_accumulator_value`."""
    init = hyper.get("initial_accumulator_value", 0)
    return AdagradState(0, [z + init for z in _zeros(params)])


def adagrad_update(
    params: Sequence[T], grads: Sequence[T], state: AdagradState, hyper: Hyper
) -> tuple[list[T], AdagradState]:
    """One step of `torch.optim.Adagrad`, out of place."""
    lr, lrs = split_lr(hyper)
    wd, eps, lr_decay = hyper["weight_decay"], hyper["eps"], hyper["lr_decay"]
    maximize = flag(ADAGRAD, hyper, "maximize")
    step = state.step + 1

    def kernel(p: T, g: T, s: T, lr_t: T | None) -> tuple[T, T]:
        step_lr = lr if lr_t is None else lr_t
        g = -g if maximize else g
        if not is_zero(wd):
            g = g + wd * p
        clr = step_lr / (1 + (step - 1) * lr_decay)
        s = s + g * g
        return p - clr * (g / (sqrt0(s) + eps)), s

    new_p, s = elementwise(kernel, params, grads, state.sum, lrs)
    return some(new_p), AdagradState(step, some(s))


ADAGRAD = Rule(
    name="Adagrad",
    state_type=AdagradState,
    init=adagrad_init,
    update=adagrad_update,
    hypers=("lr", "lr_decay", "weight_decay", "eps", "initial_accumulator_value"),
    flags={"maximize": False},
    sparse=True,
    per_element=("lr", "lr_decay", "weight_decay", "eps", "initial_accumulator_value"),
)


class AdadeltaState(NamedTuple):
    """Step count, running average of squared gradients and of squared updates."""

    step: int
    square_avg: list[T]
    acc_delta: list[T]


def adadelta_init(params: Sequence[T], hyper: Hyper) -> AdadeltaState:
    """Zero averages at step 0."""
    return AdadeltaState(0, _zeros(params), _zeros(params))


def adadelta_update(
    params: Sequence[T], grads: Sequence[T], state: AdadeltaState, hyper: Hyper
) -> tuple[list[T], AdadeltaState]:
    """One step of `torch.optim.Adadelta`, out of place."""
    lr, lrs = split_lr(hyper)
    rho, eps, wd = hyper["rho"], hyper["eps"], hyper["weight_decay"]
    maximize = flag(ADADELTA, hyper, "maximize")

    def kernel(p: T, g: T, sq: T, acc: T, lr_t: T | None) -> tuple[T, T, T]:
        step_lr = lr if lr_t is None else lr_t
        g = -g if maximize else g
        if not is_zero(wd):
            g = g + wd * p
        sq = sq * rho + (1 - rho) * g * g
        std = sqrt0(sq + eps)
        delta = sqrt0(acc + eps) / std * g
        acc = acc * rho + (1 - rho) * delta * delta
        return p - step_lr * delta, sq, acc

    new_p, sq, acc = elementwise(kernel, params, grads, state.square_avg, state.acc_delta, lrs)
    return some(new_p), AdadeltaState(state.step + 1, some(sq), some(acc))


ADADELTA = Rule(
    name="Adadelta",
    state_type=AdadeltaState,
    init=adadelta_init,
    update=adadelta_update,
    hypers=("lr", "rho", "eps", "weight_decay"),
    flags={"maximize": False},
    per_element=("lr", "rho", "eps", "weight_decay"),
)


class RMSpropState(NamedTuple):
    """Step count, running average of squared gradients; `momentum_buffer` with momentum and
    `grad_avg` when centered."""

    step: int
    square_avg: list[T]
    momentum_buffer: list[T] | None
    grad_avg: list[T] | None


def _uses_momentum(momentum: object) -> bool:
    return isinstance(momentum, torch.Tensor) or float(momentum) > 0  # type: ignore[arg-type]


def rmsprop_init(params: Sequence[T], hyper: Hyper) -> RMSpropState:
    """Zero averages at step 0; buffers only for the options that need them."""
    momentum = _zeros(params) if _uses_momentum(hyper.get("momentum", 0)) else None
    centered = _zeros(params) if hyper.get("centered", False) else None
    return RMSpropState(0, _zeros(params), momentum, centered)


def rmsprop_update(
    params: Sequence[T], grads: Sequence[T], state: RMSpropState, hyper: Hyper
) -> tuple[list[T], RMSpropState]:
    """One step of `torch.optim.RMSprop`, out of place."""
    lr, lrs = split_lr(hyper)
    alpha, eps, wd, momentum = (
        hyper["alpha"],
        hyper["eps"],
        hyper["weight_decay"],
        hyper["momentum"],
    )
    centered, maximize = flag(RMSPROP, hyper, "centered"), flag(RMSPROP, hyper, "maximize")
    use_momentum = _uses_momentum(momentum)

    def kernel(
        p: T, g: T, sq: T, buf: T | None, ga: T | None, lr_t: T | None
    ) -> tuple[T, T, T | None, T | None]:
        step_lr = lr if lr_t is None else lr_t
        g = -g if maximize else g
        if not is_zero(wd):
            g = g + wd * p
        sq = sq * alpha + (1 - alpha) * g * g
        if centered:
            ga = torch.zeros_like(g) if ga is None else ga
            ga = ga + (g - ga) * (1 - alpha)
            avg = sqrt0(sq - ga * ga) + eps
        else:
            avg = sqrt0(sq) + eps
        if use_momentum:
            buf = torch.zeros_like(g) if buf is None else buf
            buf = buf * momentum + g / avg
            return p - step_lr * buf, sq, buf, ga
        return p - step_lr * (g / avg), sq, buf, ga

    lists = elementwise(
        kernel, params, grads, state.square_avg, state.momentum_buffer, state.grad_avg, lrs
    )
    new_p, sq, buf, ga = lists
    return some(new_p), RMSpropState(
        state.step + 1,
        some(sq),
        some(buf) if use_momentum else state.momentum_buffer,
        some(ga) if centered else state.grad_avg,
    )


RMSPROP = Rule(
    name="RMSprop",
    state_type=RMSpropState,
    init=rmsprop_init,
    update=rmsprop_update,
    hypers=("lr", "alpha", "eps", "weight_decay", "momentum"),
    flags={"centered": False, "maximize": False},
    per_element=("lr", "alpha", "eps", "weight_decay", "momentum"),
)
