"""The update rules as pure functions, usable without any module or optimizer object.

Each factory returns a `FunctionalOptimizer(init, step)`: `state = opt.init(params)`, then
`params, state = opt.step(grads, state, params)` returns the NEW PARAMETERS (not updates to
add, as optax's `update` does: there is no `apply_updates` step, and adding the result to the
parameters would step twice). Nothing is modified in place, so the whole unroll is
differentiable. States are typed `NamedTuple`s.

Examples:
    >>> import torch
    >>> from higher.optim import functional as F
    >>> w = torch.ones(2, requires_grad=True)
    >>> opt = F.adam(lr=0.1)
    >>> state = opt.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = opt.step([g], state, [w])
    >>> [round(v, 6) for v in w1.tolist()], state.step
    ([0.9, 0.9], 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ._rule import Rule, check_hyper
from ._rules_adam import ADAM, ADAMW, AdamState
from ._rules_adam_variants import ADAMAX, NADAM, RADAM, AdamaxState, NAdamState, RAdamState
from ._rules_adaptive import ADADELTA, ADAGRAD, RMSPROP, AdadeltaState, AdagradState, RMSpropState
from ._rules_other import ADAFACTOR, ASGD, RPROP, AdafactorState, ASGDState, RpropState
from ._rules_sgd import SGD, SGDState

T = torch.Tensor


class FunctionalOptimizer(NamedTuple):
    """`init(params) -> state` and `step(grads, state, params) -> (new_params, new_state)`.

    `step` returns the new parameters themselves (not optax-style updates to add to them).
    `update` is the same function under the name 0.3.0 gave it.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.sgd(lr=0.5, momentum=0.9)
        >>> new, state = opt.step([torch.ones(1)], opt.init([torch.ones(1)]), [torch.ones(1)])
        >>> new[0].item(), state.momentum_buffer[0].item()
        (0.5, 1.0)
    """

    init: Callable[[Sequence[T]], Any]
    step: Callable[[Sequence[T], Any, Sequence[T]], tuple[list[T], Any]]

    @property
    def update(self) -> Callable[[Sequence[T], Any, Sequence[T]], tuple[list[T], Any]]:
        """`step`, under its 0.3.0 name."""
        return self.step


#: The 0.3.0 name of `FunctionalOptimizer` (it is no optax transformation: it returns the new
#: parameters, not updates).
GradientTransformation = FunctionalOptimizer


def _make(rule: Rule, hyper: dict[str, Any]) -> FunctionalOptimizer:
    check_hyper(rule, hyper)

    def init(params: Sequence[T]) -> Any:
        return rule.init(list(params), hyper)

    def step(grads: Sequence[T], state: Any, params: Sequence[T]) -> tuple[list[T], Any]:
        return rule.update(list(params), list(grads), state, hyper)

    return FunctionalOptimizer(init, step)


def sgd(
    lr: Any = 1e-3,
    momentum: Any = 0.0,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.SGD` as a pure rule (hyperparameters may be tensors that require grad).

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.sgd(lr=0.5)
        >>> opt.step([torch.ones(1)], opt.init([torch.ones(1)]), [torch.ones(1)])[0][0].item()
        0.5
    """
    return _make(SGD, dict(locals()))


def adam(
    lr: Any = 1e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.Adam` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.adam(lr=0.1)
        >>> new, _ = opt.step([torch.ones(1)], opt.init([torch.ones(1)]), [torch.ones(1)])
        >>> round(new[0].item(), 6)
        0.9
    """
    return _make(ADAM, dict(locals()))


def adamw(
    lr: Any = 1e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.AdamW` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.adamw(lr=0.1)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.899, 1)
    """
    return _make(ADAMW, dict(locals()))


def adagrad(
    lr: Any = 1e-2,
    lr_decay: Any = 0.0,
    weight_decay: Any = 0.0,
    initial_accumulator_value: Any = 0.0,
    eps: Any = 1e-10,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.Adagrad` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.adagrad(lr=0.1)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.9, 1)
    """
    return _make(ADAGRAD, dict(locals()))


def adadelta(
    lr: Any = 1.0, rho: Any = 0.9, eps: Any = 1e-6, weight_decay: Any = 0.0, maximize: bool = False
) -> FunctionalOptimizer:
    """`torch.optim.Adadelta` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.adadelta(lr=1.0)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.9968, 1)
    """
    return _make(ADADELTA, dict(locals()))


def adamax(
    lr: Any = 2e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.Adamax` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.adamax(lr=0.1)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.9, 1)
    """
    return _make(ADAMAX, dict(locals()))


def asgd(
    lr: Any = 1e-2,
    lambd: Any = 1e-4,
    alpha: Any = 0.75,
    t0: Any = 1e6,
    weight_decay: Any = 0.0,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.ASGD` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.asgd(lr=0.5)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.7499, 1)
    """
    return _make(ASGD, dict(locals()))


def rmsprop(
    lr: Any = 1e-2,
    alpha: Any = 0.99,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    momentum: Any = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.RMSprop` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.rmsprop(lr=0.01, centered=True)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.8995, 1)
    """
    return _make(RMSPROP, dict(locals()))


def rprop(
    lr: Any = 1e-2,
    etas: tuple[Any, Any] = (0.5, 1.2),
    step_sizes: tuple[Any, Any] = (1e-6, 50.0),
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.Rprop` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.rprop(lr=0.1)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.9, 1)
    """
    return _make(RPROP, dict(locals()))


def nadam(
    lr: Any = 2e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    momentum_decay: Any = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.NAdam` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.nadam(lr=0.1)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.8944, 1)
    """
    return _make(NADAM, dict(locals()))


def radam(
    lr: Any = 1e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.RAdam` as a pure rule.

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.radam(lr=0.1)
        >>> w = torch.ones(2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.95, 1)
    """
    return _make(RADAM, dict(locals()))


def adafactor(
    lr: Any = 1e-2,
    beta2_decay: Any = -0.8,
    eps: tuple[Any, Any] = (None, 1e-3),
    d: Any = 1.0,
    weight_decay: Any = 0.0,
    maximize: bool = False,
) -> FunctionalOptimizer:
    """`torch.optim.Adafactor` as a pure rule (available whatever the torch version).

    Examples:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> opt = F.adafactor(lr=0.1)
        >>> w = torch.ones(2, 2)
        >>> new, state = opt.step([torch.full_like(w, 0.5)], opt.init([w]), [w])
        >>> round(new[0].flatten()[0].item(), 4), state.step
        (0.9, 1)
    """
    return _make(ADAFACTOR, dict(locals()))


__all__ = [
    "FunctionalOptimizer",
    "sgd",
    "adam",
    "adamw",
    "adagrad",
    "adadelta",
    "adamax",
    "asgd",
    "rmsprop",
    "rprop",
    "nadam",
    "radam",
    "adafactor",
    "SGDState",
    "AdamState",
    "AdagradState",
    "AdadeltaState",
    "AdamaxState",
    "ASGDState",
    "RMSpropState",
    "RpropState",
    "NAdamState",
    "RAdamState",
    "AdafactorState",
]
