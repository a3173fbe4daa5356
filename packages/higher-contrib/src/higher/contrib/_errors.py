"""The error types of `higher.contrib` (`higher.HigherError` is the base of every error)."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


class HypergradientMismatch(HigherError, AssertionError):
    """Autograd and finite differences disagree; `report` holds every compared number.

    It is an `AssertionError`, so pytest shows it as a failed check.

    Examples:
        >>> import torch, higher.contrib
        >>> wrong = lambda x: (x**2).sum() + (x.detach() ** 2).sum()  # autograd misses half
        >>> try:
        ...     higher.contrib.check_hypergradient(wrong, {"x": torch.ones(2)})
        ... except higher.contrib.HypergradientMismatch as err:
        ...     print(err.report.failures[0].tensor)
        x
    """

    __module__ = "higher.contrib"  # its public path, for tracebacks, pickle and the docs

    def __init__(self, report: HypergradientReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self) -> tuple[type, tuple[HypergradientReport]]:  # pickles with its report
        return type(self), (self.report,)


class ConformanceFailure(HigherError, AssertionError):
    """A differentiable optimizer departs from its torch original; `report` says where.

    Examples:
        >>> import torch, higher.optim, higher.contrib
        >>> class Sloppy(higher.optim.DifferentiableOptimizer):  # a twin that never steps
        ...     def _update(self, grouped_grads, **kwargs):
        ...         pass
        >>> report = higher.contrib.optimizer_conformance_report(
        ...     torch.optim.SGD, Sloppy, [{"lr": 0.1}], checks=["steps"])
        >>> try:
        ...     report.raise_if_failed()
        ... except higher.contrib.ConformanceFailure as err:  # an AssertionError for pytest
        ...     print(err.report.failures[0].detail.split(":")[0])
        step 1 of 10
    """

    __module__ = "higher.contrib"  # its public path, for tracebacks, pickle and the docs

    def __init__(self, report: ConformanceReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self) -> tuple[type, tuple[ConformanceReport]]:  # pickles with its report
        return type(self), (self.report,)


if TYPE_CHECKING:
    from ._conformance import ConformanceReport
    from ._hypergrad import HypergradientReport
