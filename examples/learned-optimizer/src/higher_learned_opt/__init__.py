"""A learned optimizer for PyTorch, meta-trained with `higher`, and its differentiable twin.

`LearnedOptimizer` is an ordinary `torch.optim.Optimizer` whose step is a small MLP applied to
every coordinate (`FEATURES`: the gradient, three momenta, the parameter, the step count), its
weights meta-trained (examples/learned_optimizer.py); the trained weights ship with the package
(`pretrained_weights()`). Installing this distribution registers `DifferentiableLearnedOptimizer`
in the entry-point group `higher.optimizers`, so `higher.innerloop_ctx(model,
LearnedOptimizer(...))` unrolls it and `higher.estimators.InnerProblem` meta-trains its weights.

Examples:
    >>> import torch, higher.optim
    >>> from higher_learned_opt import LearnedOptimizer
    >>> higher.optim.twin_of(LearnedOptimizer).__name__
    'DifferentiableLearnedOptimizer'
"""

from ._optimizer import LearnedOptimizer as LearnedOptimizer
from ._optimizer import load_weights as load_weights
from ._optimizer import pretrained_info as pretrained_info
from ._optimizer import pretrained_weights as pretrained_weights
from ._optimizer import save_weights as save_weights
from ._rule import FEATURES as FEATURES
from ._rule import LEARNED as LEARNED
from ._rule import LearnedState as LearnedState
from ._rule import init_weights as init_weights
from ._rule import weight_count as weight_count
from ._twin import DifferentiableLearnedOptimizer as DifferentiableLearnedOptimizer

# The entry point names the optimizer by its public path: `higher_learned_opt.LearnedOptimizer`.
LearnedOptimizer.__module__ = __name__
DifferentiableLearnedOptimizer.__module__ = __name__

__all__ = [
    "LearnedOptimizer",
    "DifferentiableLearnedOptimizer",
    "LEARNED",
    "LearnedState",
    "FEATURES",
    "init_weights",
    "weight_count",
    "pretrained_weights",
    "pretrained_info",
    "save_weights",
    "load_weights",
]
