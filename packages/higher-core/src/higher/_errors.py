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
