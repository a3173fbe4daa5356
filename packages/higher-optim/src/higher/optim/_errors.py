"""The error types of `higher.optim` (`higher.errors.HigherError` is the base of every error)."""

from __future__ import annotations

from higher.errors import HigherError


class OptimError(HigherError, ValueError):
    """Invalid input to a differentiable optimizer: a bad loss, params, override or option.

    It is a `ValueError`, as in higher 0.2.1, so `except ValueError` keeps working.

    Examples:
        >>> import torch, higher.optim
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> try:
        ...     higher.optim.get_diff_optim(opt, [], override={"lr": [1, 2]})
        ... except higher.optim.OptimError as err:
        ...     print(isinstance(err, ValueError))
        True
    """

    __module__ = "higher.optim"  # its public path, for tracebacks, pickle and the docs


class UnsupportedOptimizerError(OptimError):
    """No differentiable twin is known for a torch optimizer type (`LBFGS`, `SparseAdam`, ...).

    Examples:
        >>> import torch, higher.optim
        >>> opt = torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])
        >>> try:
        ...     higher.optim.get_diff_optim(opt, opt.param_groups[0]["params"])
        ... except higher.optim.UnsupportedOptimizerError as err:
        ...     print("LBFGS" in str(err))
        True
    """

    __module__ = "higher.optim"  # its public path, for tracebacks, pickle and the docs


class ArgumentTypeError(HigherError, TypeError):
    """An argument of the wrong kind: not a torch optimizer, not a tensor, an unknown keyword.

    It is a `TypeError`, so `except TypeError` catches it.

    Examples:
        >>> import higher.optim
        >>> try:
        ...     higher.optim.get_diff_optim("SGD", [])  # type: ignore[arg-type]
        ... except higher.optim.ArgumentTypeError as err:
        ...     print(err)
        expected a torch.optim.Optimizer instance, got str
    """

    __module__ = "higher.optim"  # its public path, for tracebacks, pickle and the docs


class HyperparameterTypeError(ArgumentTypeError):
    """A hyperparameter, flag or option has a value of the wrong type.

    It is a `TypeError`, so `except TypeError` catches it.

    Examples:
        >>> import torch, higher.optim
        >>> p = torch.zeros(1, requires_grad=True)
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> try:
        ...     higher.optim.get_diff_optim(opt, [p], override={"lr": ["fast"]})
        ... except higher.optim.HyperparameterTypeError as err:
        ...     print(isinstance(err, TypeError))
        True
    """

    __module__ = "higher.optim"  # its public path, for tracebacks, pickle and the docs


class PluginError(HigherError, ImportError):
    """A plugin of the entry-point group `higher.optimizers` is broken or conflicts with another.

    The message names the plugin (its entry point and distribution).

    Examples:
        >>> import higher.optim
        >>> try:
        ...     raise higher.optim.PluginError("the plugin 'x.Broken' failed to load")
        ... except ImportError as err:  # a broken plugin is an import problem
        ...     print(type(err).__name__, "-", err)
        PluginError - the plugin 'x.Broken' failed to load
    """

    __module__ = "higher.optim"  # its public path, for tracebacks, pickle and the docs
