"""The conformance kit in a plugin's test suite: its cases, a pytest mark, an asserting check.

Each is a form of `optimizer_conformance_report` (`_conformance.py`, the kit's one entry point):
`conformance_cases` lists the (check, option set) pairs it runs, `parametrize_conformance` makes
one test item of each, `check_optimizer_conformance` raises `ConformanceFailure` where the report
has a failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from ._conformance import (
    CHECKS,
    ConformanceCase,
    DiffOptimizer,
    OptionGrid,
    TorchOptimizer,
    _cases,
    optimizer_conformance_report,
)
from ._conformance_report import ConformanceReport, Tolerances

_F = TypeVar("_F", bound=Callable[..., Any])


def conformance_cases(
    torch_optimizer: TorchOptimizer,
    diff_optimizer: DiffOptimizer,
    options: OptionGrid = ({},),
    *,
    checks: Iterable[str] = CHECKS,
    steps: int = 10,
    hyperparameters: Iterable[str] | None = None,
    tolerances: Tolerances | None = None,
) -> list[ConformanceCase]:
    """Every (check, option set) pair as a `ConformanceCase`; `registry` runs once (first set).

    The arguments are `optimizer_conformance_report`'s.

    Examples:
        >>> import torch, higher.optim, higher.contrib
        >>> cases = higher.contrib.conformance_cases(
        ...     torch.optim.Adam, higher.optim.DifferentiableAdam, {"amsgrad": [False, True]}
        ... )
        >>> [c.id for c in cases][:3]
        ['steps-amsgrad=False', 'hypergradient-amsgrad=False', 'zero_grad-amsgrad=False']
    """
    return _cases(
        torch_optimizer, diff_optimizer, options, checks=checks, steps=steps,
        hyperparameters=hyperparameters, tolerances=tolerances,
    )  # fmt: skip


def check_optimizer_conformance(
    torch_optimizer: TorchOptimizer,
    diff_optimizer: DiffOptimizer,
    options: OptionGrid = ({},),
    *,
    checks: Iterable[str] = CHECKS,
    steps: int = 10,
    hyperparameters: Iterable[str] | None = None,
    tolerances: Tolerances | None = None,
) -> ConformanceReport:
    """`optimizer_conformance_report`, raising `ConformanceFailure` when a check fails.

    Examples:
        >>> import torch, higher.optim, higher.contrib
        >>> higher.contrib.check_optimizer_conformance(
        ...     torch.optim.Adam, higher.optim.DifferentiableAdam, {"lr": [1e-3, 0.1]}
        ... ).ok
        True
    """
    report = optimizer_conformance_report(
        torch_optimizer, diff_optimizer, options, checks=checks, steps=steps,
        hyperparameters=hyperparameters, tolerances=tolerances,
    )  # fmt: skip
    report.raise_if_failed()
    return report


def parametrize_conformance(
    torch_optimizer: TorchOptimizer,
    diff_optimizer: DiffOptimizer,
    options: OptionGrid = ({},),
    *,
    checks: Iterable[str] = CHECKS,
    steps: int = 10,
    hyperparameters: Iterable[str] | None = None,
    tolerances: Tolerances | None = None,
    argname: str = "conformance_case",
) -> Callable[[_F], _F]:
    """A `pytest.mark.parametrize` over `conformance_cases`: one test item per check and option set.

    Example (in a plugin's tests)::

        @parametrize_conformance(Lion, DifferentiableLion, {"lr": [1e-4, 0.1]})
        def test_lion_conforms(conformance_case):
            conformance_case.run()

    Examples:
        >>> import torch, higher.optim, higher.contrib
        >>> mark = higher.contrib.parametrize_conformance(
        ...     torch.optim.SGD, higher.optim.DifferentiableSGD, [{"lr": 0.1}], checks=["registry"]
        ... )
        >>> @mark
        ... def test_sgd(conformance_case):
        ...     conformance_case.run()
        >>> [p.id for p in test_sgd.pytestmark[0].args[1]]
        ['registry']
    """
    import pytest  # only here: pytest is a test-time dependency of the plugin, not ours

    cases = _cases(
        torch_optimizer, diff_optimizer, options, checks=checks, steps=steps,
        hyperparameters=hyperparameters, tolerances=tolerances,
    )  # fmt: skip
    params = [pytest.param(c, id=c.id) for c in cases]
    return cast(Callable[[_F], _F], pytest.mark.parametrize(argname, params))
