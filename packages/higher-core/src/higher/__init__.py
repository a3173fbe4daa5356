__path__ = __import__("pkgutil").extend_path(__path__, __name__)
__doc__ = """Differentiate through whole PyTorch training loops.

`innerloop_ctx(model, opt)` gives a functional copy of `model` and a differentiable twin of the
torch optimizer `opt`: unroll `k` steps, then take gradients of anything computed from the last
weights with respect to the first ones, the optimizer's hyperparameters, or the data.

Examples:
    >>> import torch, higher
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
    ...     _ = diffopt.step(fmodel(torch.ones(1, 2)).pow(2).sum())
    ...     fmodel(torch.ones(1, 2)).sum().backward()
    >>> model.weight.grad.shape  # d(loss after the step) / d(initial weights)
    torch.Size([1, 2])
"""

from higher import distributed as distributed
from higher import errors as errors
from higher import estimators as estimators
from higher import implicit as implicit
from higher import optim as optim
from higher import patch as patch
from higher import utils as utils
from higher._context import batched_innerloop_ctx as batched_innerloop_ctx
from higher._context import innerloop_ctx as innerloop_ctx
from higher._errors import CompositionError as CompositionError
from higher._errors import FastPathError as FastPathError
from higher._errors import UnrollError as UnrollError
from higher._errors import UsageError as UsageError
from higher._fast.compiled import CompiledStep as CompiledStep
from higher._fast.compiled import compile_step as compile_step
from higher._fast.metastep import MetaStep as MetaStep
from higher._fast.metastep import compile_meta_step as compile_meta_step
from higher._fast.metastep import meta_step as meta_step
from higher._fast.tasks import BatchedModule as BatchedModule
from higher._fast.tasks import BatchedOptimizer as BatchedOptimizer
from higher._unroll.modes import ForwardMode as ForwardMode
from higher._unroll.modes import Full as Full
from higher._unroll.modes import Recompute as Recompute
from higher._unroll.modes import Truncated as Truncated
from higher.errors import HigherError as HigherError
from higher.errors import HigherWarning as HigherWarning
from higher.optim import create_diff_optim as create_diff_optim
from higher.optim import get_diff_optim as get_diff_optim
from higher.optim import register_optim as register_optim
from higher.patch import monkeypatch as monkeypatch

__version__ = "0.3.0"

__all__ = [
    "innerloop_ctx",
    "meta_step",
    "compile_step",
    "CompiledStep",
    "Full",
    "Recompute",
    "Truncated",
    "ForwardMode",
    "compile_meta_step",
    "MetaStep",
    "batched_innerloop_ctx",
    "BatchedModule",
    "BatchedOptimizer",
    "monkeypatch",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "HigherError",
    "HigherWarning",
    "UsageError",
    "UnrollError",
    "FastPathError",
    "CompositionError",
    "errors",
    "estimators",
    "distributed",
    "implicit",
    "patch",
    "optim",
    "utils",
    "__version__",
]
