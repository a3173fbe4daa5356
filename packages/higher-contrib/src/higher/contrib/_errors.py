"""The error types of `higher.contrib` (`higher.HigherError` is the base of every error)."""

from __future__ import annotations

from higher.errors import HigherError as HigherError


class ContribError(HigherError, ValueError):
    """Invalid input to a `higher.contrib` tool (a non-scalar meta-loss, an unknown tensor name...).

    Examples:
        >>> import torch, higher.contrib
        >>> try:
        ...     higher.contrib.hypergradient_report(lambda x: x * 2, [torch.ones(3)])
        ... except higher.contrib.ContribError as err:
        ...     print(isinstance(err, ValueError))
        True
    """

    __module__ = "higher.contrib"  # its public path, for tracebacks, pickle and the docs
