"""The base classes of every error and warning `higher` raises, shared by all its distributions.

`higher-patch` and `higher-optim` may not import each other, yet their errors must share one
base, for the type checker as much as at run time: the base lives here, in a distribution both
depend on. Each error class of the library subclasses `HigherError` and the builtin exception
higher 0.2.1 raised in its place, so `except ValueError` code keeps working.

Examples:
    >>> import higher.errors
    >>> class MyError(higher.errors.HigherError, ValueError): ...
    >>> isinstance(MyError("bad lr"), higher.errors.HigherError)
    True
"""

from __future__ import annotations

__all__ = ["HigherError", "HigherWarning"]


class HigherError(Exception):
    """Base of every error `higher` raises; each subclass is also the builtin 0.2.1 raised.

    Examples:
        >>> import higher.errors
        >>> class StepError(higher.errors.HigherError, ValueError): ...
        >>> try:
        ...     raise StepError("the loss must be a scalar")
        ... except ValueError as err:  # as higher 0.2.1 code catches it
        ...     print(type(err).__name__, isinstance(err, higher.errors.HigherError))
        StepError True
    """


class HigherWarning(UserWarning):
    """Base of every warning `higher` emits (filter them all with this one class).

    Examples:
        >>> import warnings, higher.errors
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("a plugin claims a built-in", higher.errors.HigherWarning)
        >>> seen[0].category.__name__
        'HigherWarning'
    """
