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


class DistributedError(HigherError, RuntimeError):
    """Ranks disagree, or a collective across them failed (also a `RuntimeError`).

    Raised by `higher.distributed` when the ranks pass different tensors to one reduction, when
    a rank raised, exited or never reached the reduction before the process group's timeout, or
    when a launcher says there are several processes but `torch.distributed` is not initialized.

    Example:
        >>> issubclass(higher.distributed.DistributedError, RuntimeError)
        True
    """


class DistributedValueError(HigherError, ValueError):
    """An argument of `higher.distributed` has a wrong value (also a `ValueError`).

    Example:
        >>> try:
        ...     higher.distributed.shard(range(4), rank=2, world_size=2)
        ... except higher.distributed.DistributedValueError as err:
        ...     print(err)
        rank must be in [0, 2), got 2
    """
