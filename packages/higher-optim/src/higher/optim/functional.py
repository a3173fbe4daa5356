"""The update rules as pure functions, usable without any module or optimizer object.

Each factory returns a `GradientTransformation(init, update)` in the style of optax:
`state = tx.init(params)`, then `params, state = tx.update(grads, state, params)`; nothing is
modified in place, so the whole unroll is differentiable. States are typed `NamedTuple`s.

Example:
    >>> import torch
    >>> from higher.optim import functional as F
    >>> w = torch.ones(2, requires_grad=True)
    >>> tx = F.adam(lr=0.1)
    >>> state = tx.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = tx.update([g], state, [w])
    >>> state.step
    1
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


class GradientTransformation(NamedTuple):
    """`init(params) -> state` and `update(grads, state, params) -> (new_params, new_state)`.

    Example:
        >>> from higher.optim import functional as F
        >>> F.sgd(lr=0.1).init([]).momentum_buffer is None
        True
    """

    init: Callable[[Sequence[T]], Any]
    update: Callable[[Sequence[T], Any, Sequence[T]], tuple[list[T], Any]]


def _make(rule: Rule, hyper: dict[str, Any]) -> GradientTransformation:
    check_hyper(rule, hyper)

    def init(params: Sequence[T]) -> Any:
        return rule.init(list(params), hyper)

    def update(grads: Sequence[T], state: Any, params: Sequence[T]) -> tuple[list[T], Any]:
        return rule.update(list(params), list(grads), state, hyper)

    return GradientTransformation(init, update)


def sgd(
    lr: Any = 1e-3,
    momentum: Any = 0.0,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """`torch.optim.SGD` as a pure rule (hyperparameters may be tensors that require grad).

    Example:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> tx = F.sgd(lr=0.5)
        >>> tx.update([torch.ones(1)], tx.init([torch.ones(1)]), [torch.ones(1)])[0][0].item()
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
) -> GradientTransformation:
    """`torch.optim.Adam` as a pure rule.

    Example:
        >>> import torch
        >>> from higher.optim import functional as F
        >>> tx = F.adam(lr=0.1)
        >>> new, _ = tx.update([torch.ones(1)], tx.init([torch.ones(1)]), [torch.ones(1)])
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
) -> GradientTransformation:
    """`torch.optim.AdamW` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.adamw(lr=0.1).init([]).step
        0
    """
    return _make(ADAMW, dict(locals()))


def adagrad(
    lr: Any = 1e-2,
    lr_decay: Any = 0.0,
    weight_decay: Any = 0.0,
    initial_accumulator_value: Any = 0.0,
    eps: Any = 1e-10,
    maximize: bool = False,
) -> GradientTransformation:
    """`torch.optim.Adagrad` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.adagrad().init([]).sum
        []
    """
    return _make(ADAGRAD, dict(locals()))


def adadelta(
    lr: Any = 1.0, rho: Any = 0.9, eps: Any = 1e-6, weight_decay: Any = 0.0, maximize: bool = False
) -> GradientTransformation:
    """`torch.optim.Adadelta` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.adadelta().init([]).step
        0
    """
    return _make(ADADELTA, dict(locals()))


def adamax(
    lr: Any = 2e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """`torch.optim.Adamax` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.adamax().init([]).exp_inf
        []
    """
    return _make(ADAMAX, dict(locals()))


def asgd(
    lr: Any = 1e-2,
    lambd: Any = 1e-4,
    alpha: Any = 0.75,
    t0: Any = 1e6,
    weight_decay: Any = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """`torch.optim.ASGD` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.asgd(lr=0.5).init([]).eta.item()
        0.5
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
) -> GradientTransformation:
    """`torch.optim.RMSprop` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.rmsprop(centered=True).init([]).grad_avg
        []
    """
    return _make(RMSPROP, dict(locals()))


def rprop(
    lr: Any = 1e-2,
    etas: tuple[Any, Any] = (0.5, 1.2),
    step_sizes: tuple[Any, Any] = (1e-6, 50.0),
    maximize: bool = False,
) -> GradientTransformation:
    """`torch.optim.Rprop` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.rprop().init([]).step_size
        []
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
) -> GradientTransformation:
    """`torch.optim.NAdam` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.nadam().init([]).mu_product.item()
        1.0
    """
    return _make(NADAM, dict(locals()))


def radam(
    lr: Any = 1e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """`torch.optim.RAdam` as a pure rule.

    Example:
        >>> from higher.optim import functional as F
        >>> F.radam().init([]).step
        0
    """
    return _make(RADAM, dict(locals()))


def adafactor(
    lr: Any = 1e-2,
    beta2_decay: Any = -0.8,
    eps: tuple[Any, Any] = (None, 1e-3),
    d: Any = 1.0,
    weight_decay: Any = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """`torch.optim.Adafactor` as a pure rule (available whatever the torch version).

    Example:
        >>> from higher.optim import functional as F
        >>> F.adafactor().init([]).variance
        []
    """
    return _make(ADAFACTOR, dict(locals()))


__all__ = [
    "GradientTransformation",
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
