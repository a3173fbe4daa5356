"""The Lion optimizer for PyTorch, and its differentiable twin for `higher`.

Installing this distribution is all it takes: `higher` finds `DifferentiableLion` through the
entry-point group `higher.optimizers`, so `higher.innerloop_ctx(model, Lion(...))` works.

Examples:
    >>> import torch, higher.optim
    >>> from higher_lion import Lion
    >>> higher.optim.twin_of(Lion).__name__
    'DifferentiableLion'
"""

from ._lion import Lion as Lion
from ._twin import LION as LION
from ._twin import DifferentiableLion as DifferentiableLion
from ._twin import LionState as LionState

# The entry point names the optimizer by its public path: `higher_lion.Lion`.
Lion.__module__ = __name__
DifferentiableLion.__module__ = __name__

__all__ = ["Lion", "DifferentiableLion", "LION", "LionState"]
