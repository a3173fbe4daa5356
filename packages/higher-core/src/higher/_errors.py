"""Errors of the top-level API (all share the `HigherError` base of every distribution)."""

from __future__ import annotations

from higher.errors import HigherError


class UsageError(HigherError, TypeError):
    """A top-level function got an argument of the wrong kind (also a `TypeError`).

    Example:
        >>> try:
        ...     with higher.innerloop_ctx("model", None):  # type: ignore[arg-type]
        ...         pass
        ... except higher.UsageError as err:
        ...     print(err)
        model must be a torch.nn.Module, got str
    """


class FastPathError(HigherError, ValueError):
    """A fast path (batched tasks, the compiled meta-step) refused its input: a value of the
    wrong shape, or a model, optimizer or torch it cannot run exactly (also a `ValueError`).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> try:
        ...     with higher.batched_innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1),
        ...                                       tasks=0):
        ...         pass
        ... except higher.FastPathError as err:
        ...     print(err)
        tasks must be a positive int (the number of tasks batched), got 0
    """
