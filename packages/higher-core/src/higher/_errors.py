"""Errors of the top-level API (all share the `HigherError` base of every distribution)."""

from __future__ import annotations

from higher.errors import HigherError


class UsageError(HigherError, TypeError):
    """A top-level function got an argument of the wrong kind (also a `TypeError`).

    Examples:
        >>> try:
        ...     with higher.innerloop_ctx("model", None):  # type: ignore[arg-type]
        ...         pass
        ... except higher.UsageError as err:
        ...     print(err)
        model must be a torch.nn.Module, got str
    """


class UnrollError(HigherError, ValueError):
    """A memory mode of `innerloop_ctx(..., unroll=...)` cannot do what was asked (also a
    `ValueError`): the message says why and what to use instead.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with higher.innerloop_ctx(model, opt, unroll="recompute") as (fmodel, diffopt):
        ...     try:
        ...         diffopt.step(fmodel(torch.ones(1, 2)).sum())
        ...     except higher.UnrollError as err:
        ...         print(str(err)[:46])
        unroll='recompute' rebuilds each step during t
    """
