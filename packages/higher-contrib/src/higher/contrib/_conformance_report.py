"""What the conformance kit found: a result per check, the report of a twin, its failure.

`ConformanceReport` collects one `CheckResult` per check and option set; `raise_if_failed`
raises `ConformanceFailure` (an `AssertionError`, so pytest shows it as a failed check).
`Tolerances` says how close is equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from higher.errors import HigherError


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check for one option set.

    Examples:
        >>> from higher.contrib import CheckResult
        >>> CheckResult("steps", {"lr": 0.1}, True, "10 steps equal").label
        'steps [lr=0.1]'
    """

    check: str
    options: Mapping[str, Any]
    ok: bool
    detail: str

    @property
    def label(self) -> str:
        """`check [option=value, ...]`: which check, on which options (`registry` alone)."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.check} [{opts}]" if opts and self.check != "registry" else self.check


@dataclass(frozen=True)
class ConformanceReport:
    """Every check the kit ran on one twin, with what it found.

    Examples:
        >>> import torch, higher.optim, higher.contrib
        >>> report = higher.contrib.optimizer_conformance_report(
        ...     torch.optim.SGD, higher.optim.DifferentiableSGD, {"lr": [0.1]}, checks=["steps"]
        ... )
        >>> report.ok, [r.label for r in report.results]
        (True, ['steps [lr=0.1]'])
    """

    torch_optimizer: str
    diff_optimizer: str
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        """The checks that failed."""
        return tuple(r for r in self.results if not r.ok)

    def summary(self) -> str:
        """A readable account: a headline, then one block per failed check."""
        head = f"conformance of {self.diff_optimizer} to {self.torch_optimizer}"
        if self.ok:
            return f"{head}: all {len(self.results)} checks passed"
        lines = [f"{head}: {len(self.failures)} of {len(self.results)} checks failed"]
        for r in self.failures:
            detail = r.detail.replace("\n", "\n    ")
            lines.append(f"  FAILED {r.label}: {detail}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def raise_if_failed(self) -> None:
        """Raise `ConformanceFailure` (with this report) unless every check passed."""
        if not self.ok:
            raise ConformanceFailure(self)


@dataclass(frozen=True)
class Tolerances:
    """How close is equal: `rtol`/`atol` for steps, `fd_rtol`/`fd_atol` for hypergradients.

    Examples:
        >>> from higher.contrib import Tolerances
        >>> Tolerances().rtol
        1e-10
    """

    rtol: float = 1e-10
    atol: float = 1e-12
    fd_rtol: float = 1e-5
    fd_atol: float = 1e-7


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
