"""The toolkit for writing an update rule: how every built-in twin is written, and plugins too.

A twin written as a `Rule` (pure `init` and `update` over lists of tensors, with the options it
accepts) under `RuleOptimizer` gets everything the built-in twins have: the object API and the
step protocol, the fused kernels over many tensors, option and type checks, learnable and
per-parameter hyperparameters, `higher.compile_step`. Writing `_update` by hand (the 0.2.1
recipe) still works, as the fallback: it gets none of these but the object API.

Examples:
    >>> import torch
    >>> from typing import NamedTuple
    >>> from higher.optim.rule import Rule, elementwise, some
    >>> class HalfState(NamedTuple):  # this rule keeps no state
    ...     pass
    >>> def update(params, grads, state, hyper):  # p - lr * g / 2, on every tensor at once
    ...     (new,) = elementwise(lambda p, g: (p - hyper["lr"] * g / 2,), params, grads)
    ...     return some(new), state
    >>> HALF = Rule("Half", HalfState, lambda params, hyper: HalfState(), update, hypers=("lr",))
    >>> new, _ = HALF.update([torch.ones(2)], [torch.ones(2)], HalfState(), {"lr": 0.5})
    >>> new[0].tolist()
    [0.75, 0.75]

Its twin is `class DifferentiableHalf(higher.optim.RuleOptimizer): rule = HALF`, registered for
the torch optimizer whose options it honours (`register_optim`, or an entry point).
"""

from ._kernel import compiling as compiling
from ._kernel import elementwise as elementwise
from ._kernel import is_zero as is_zero
from ._kernel import some as some
from ._kernel import sqrt0 as sqrt0
from ._rule import BOOKKEEPING_KEYS as BOOKKEEPING_KEYS
from ._rule import IMPLEMENTATION_FLAGS as IMPLEMENTATION_FLAGS
from ._rule import Hyper as Hyper
from ._rule import Rule as Rule
from ._rule import flag as flag
from ._rule import split_lr as split_lr

__all__ = [
    "Rule",
    "Hyper",
    "elementwise",
    "sqrt0",
    "is_zero",
    "some",
    "flag",
    "split_lr",
    "compiling",
    "IMPLEMENTATION_FLAGS",
    "BOOKKEEPING_KEYS",
]
