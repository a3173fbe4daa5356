"""The error types of `higher.patch` (`higher.errors.HigherError` is the base of every error)."""

from __future__ import annotations

from higher.errors import HigherError


class PatchError(HigherError, ValueError):
    """Invalid input to a functional module: wrong `params`, `time`, or module.

    It is a `ValueError`, as in higher 0.2.1, so `except ValueError` keeps working.

    Examples:
        >>> import higher.patch
        >>> try:
        ...     higher.patch.monkeypatch("not a module")  # type: ignore[arg-type]
        ... except higher.patch.PatchError as err:
        ...     print(isinstance(err, ValueError))
        True
    """

    __module__ = "higher.patch"  # its public path, for tracebacks, pickle and the docs
