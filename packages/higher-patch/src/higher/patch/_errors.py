"""The error types of `higher.patch` (`higher.HigherError` is the base of every error we raise)."""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING


def _shared_base() -> type[Exception]:
    # One base for all distributions without an import between them: the first to load creates it
    # in a private module of the `higher` namespace; every other one reuses that very class.
    shared = sys.modules.setdefault("higher._error_base", types.ModuleType("higher._error_base"))
    base: type[Exception] | None = getattr(shared, "HigherError", None)
    if base is None:
        doc = "Base of every error `higher` raises; each also subclasses the builtin 0.2.1 raised."
        base = type("HigherError", (Exception,), {"__doc__": doc, "__module__": "higher"})
        setattr(shared, "HigherError", base)  # noqa: B010  (a module made at run time)
    return base


if TYPE_CHECKING:

    class HigherError(Exception):
        """Base of every error `higher` raises."""

else:
    HigherError = _shared_base()


class PatchError(HigherError, ValueError):
    """Invalid input to a functional module: wrong `params`, `time`, or module.

    It is a `ValueError`, as in higher 0.2.1, so `except ValueError` keeps working.

    Example:
        >>> import higher.patch
        >>> try:
        ...     higher.patch.monkeypatch("not a module")  # type: ignore[arg-type]
        ... except higher.patch.PatchError as err:
        ...     print(isinstance(err, ValueError))
        True
    """
