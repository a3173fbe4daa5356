"""Differentiable twins of the `torch.optim` optimizers.

A differentiable optimizer takes a step out of place and returns the new parameters, so a loss
computed after `k` steps can be differentiated with respect to the initial parameters and the
hyperparameters (which may be tensors that require grad). Each twin equals its `torch.optim`
optimizer step for step; `higher.optim.functional` holds the same rules as pure functions.

Examples:
    >>> import torch, higher.optim
    >>> w = torch.nn.Parameter(torch.tensor([1.0]))
    >>> lr = torch.tensor(0.1, requires_grad=True)
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> diffopt = higher.optim.get_diff_optim(opt, [w], override={"lr": [lr]})
    >>> (w1,) = diffopt.step((w**2).sum(), params=[w])
    >>> torch.autograd.grad(w1.sum(), lr)[0].item()
    -2.0
"""

from higher.errors import HigherError as HigherError

from . import functional as functional
from . import rule as rule
from ._api import apply_trainable_opt_params as apply_trainable_opt_params
from ._api import create_diff_optim as create_diff_optim
from ._api import get_diff_optim as get_diff_optim
from ._api import get_trainable_opt_params as get_trainable_opt_params
from ._base import DifferentiableOptimizer as DifferentiableOptimizer
from ._clip import clip_grad_norm as clip_grad_norm
from ._clip import clip_grad_value as clip_grad_value

# higher 0.2.1's private names that published code imports (not API: see _compat_021).
from ._compat_021 import _add as _add
from ._compat_021 import _addcdiv as _addcdiv
from ._compat_021 import _addcmul as _addcmul
from ._compat_021 import _get_mask_closure as _get_mask_closure
from ._compat_021 import _GradCallbackType as _GradCallbackType
from ._compat_021 import _GradClosureType as _GradClosureType
from ._compat_021 import _GroupedGradsType as _GroupedGradsType
from ._compat_021 import _maybe_mask as _maybe_mask
from ._compat_021 import _opt_mapping as _opt_mapping
from ._compat_021 import _OptMappingType as _OptMappingType
from ._compat_021 import _OverrideType as _OverrideType
from ._compat_021 import _recursive_apply as _recursive_apply
from ._compat_021 import _StateType as _StateType
from ._errors import ArgumentTypeError as ArgumentTypeError
from ._errors import HyperparameterTypeError as HyperparameterTypeError
from ._errors import OptimError as OptimError
from ._errors import PluginError as PluginError
from ._errors import UnsupportedOptimizerError as UnsupportedOptimizerError
from ._protocols import FunctionalModel as FunctionalModel
from ._registry import PluginWarning as PluginWarning
from ._registry import clear_plugin_cache as clear_plugin_cache
from ._registry import register_optim as register_optim
from ._registry import twin_of as twin_of
from ._rule import Rule as Rule
from ._twins import DifferentiableAdadelta as DifferentiableAdadelta
from ._twins import DifferentiableAdafactor as DifferentiableAdafactor
from ._twins import DifferentiableAdagrad as DifferentiableAdagrad
from ._twins import DifferentiableAdam as DifferentiableAdam
from ._twins import DifferentiableAdamax as DifferentiableAdamax
from ._twins import DifferentiableAdamW as DifferentiableAdamW
from ._twins import DifferentiableASGD as DifferentiableASGD
from ._twins import DifferentiableNAdam as DifferentiableNAdam
from ._twins import DifferentiableRAdam as DifferentiableRAdam
from ._twins import DifferentiableRMSprop as DifferentiableRMSprop
from ._twins import DifferentiableRprop as DifferentiableRprop
from ._twins import DifferentiableSGD as DifferentiableSGD
from ._twins import RuleOptimizer as RuleOptimizer
from ._twins import UnsupportedOptionError as UnsupportedOptionError

__all__ = [
    "DifferentiableOptimizer",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdagrad",
    "DifferentiableAdadelta",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "DifferentiableAdafactor",
    "RuleOptimizer",
    "Rule",
    "FunctionalModel",
    "clip_grad_norm",
    "clip_grad_value",
    "twin_of",
    "clear_plugin_cache",
    "functional",
    "rule",
    "HigherError",
    "OptimError",
    "UnsupportedOptimizerError",
    "UnsupportedOptionError",
    "ArgumentTypeError",
    "HyperparameterTypeError",
    "PluginError",
    "PluginWarning",
]
