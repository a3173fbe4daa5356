"""SGD (momentum, dampening, Nesterov, weight decay, maximize) as a pure rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._kernel import FUSE_MIN_TENSORS, compiling, elementwise, is_zero, some
from ._rule import Hyper, Rule, flag, split_lr

T = torch.Tensor


class SGDState(NamedTuple):
    """`momentum_buffer`: one per parameter, or None before the first step with momentum."""

    momentum_buffer: list[T] | None


_NO_MOMENTUM = SGDState(momentum_buffer=None)


def sgd_init(params: Sequence[T], hyper: Hyper) -> SGDState:
    """The state before the first step: no momentum buffer yet."""
    return _NO_MOMENTUM


def _descend(p: T, g: T, lr: float | T, fused: bool) -> T:
    """`p - lr g`: one op for a number lr, as torch.optim's `add_(g, alpha=-lr)`; `p - lr * g`
    for a tensor (0.2.1's arithmetic, bit for bit) and while compiling (equal up to one
    rounding), which torch.compile gets right where its `add(..., alpha=)` was seen wrong
    (torch 2.13)."""
    if fused and isinstance(lr, (int, float)):
        return torch.add(p, g, alpha=-lr)
    return p - lr * g


def _plain(params: Sequence[T], hyper: Hyper) -> bool:
    """Whether the step is `p - lr g` and nothing else, on few real tensors in eager mode: then
    it runs as the kernel would on each tensor, without the kernel's setup (about 6 us a step
    of a small MLP's six tensors)."""
    return (
        len(params) < FUSE_MIN_TENSORS
        and is_zero(hyper["momentum"])
        and is_zero(hyper["weight_decay"])
        and not flag(SGD, hyper, "maximize")
        and not compiling()
        and not any(map(torch.is_complex, params))
    )


def sgd_update(
    params: Sequence[T], grads: Sequence[T], state: SGDState, hyper: Hyper
) -> tuple[list[T], SGDState]:
    """One step of `torch.optim.SGD`, out of place."""
    lr, lrs = split_lr(hyper)
    if _plain(params, hyper):
        steps = [lr] * len(params) if lrs is None else lrs
        new = [_descend(p, g, s, True) for p, g, s in zip(params, grads, steps, strict=True)]
        return new, _NO_MOMENTUM
    wd, momentum, dampening = hyper["weight_decay"], hyper["momentum"], hyper["dampening"]
    nesterov, maximize = flag(SGD, hyper, "nesterov"), flag(SGD, hyper, "maximize")
    use_momentum, decay = not is_zero(momentum), not is_zero(wd)
    fused_lr = not compiling()

    def kernel(p: T, g: T, buf: T | None, lr_t: T | None) -> tuple[T, T | None]:
        step_lr = lr if lr_t is None else lr_t
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        new_buf = None
        if use_momentum:
            # torch's first buffer is the gradient itself (no dampening)
            new_buf = g if buf is None else buf * momentum + (1 - dampening) * g
            g = g + momentum * new_buf if nesterov else new_buf
        return _descend(p, g, step_lr, fused_lr), new_buf

    new_p, bufs = elementwise(kernel, params, grads, state.momentum_buffer, lrs)
    return some(new_p), SGDState(momentum_buffer=some(bufs) if use_momentum else None)


SGD = Rule(
    name="SGD",
    state_type=SGDState,
    init=sgd_init,
    update=sgd_update,
    hypers=("lr", "momentum", "dampening", "weight_decay"),
    flags={"nesterov": False, "maximize": False},
    sparse=True,
    per_element=("lr", "momentum", "dampening", "weight_decay"),
)
