"""Extras for `higher`: cuDNN-safe double backward, finite-difference checks, plugin kit.

- `cudnn_safe`: a context manager and decorator under which RNNs support double backward on
  the GPU (their ops alone run without cuDNN).
- `check_hypergradient` / `hypergradient_report`: autograd's gradient of a meta-loss against
  float64 central differences, with a readable report.
- `optimizer_conformance_report`: the conformance kit a differentiable-optimizer plugin runs
  against its torch original (its one entry point); `check_optimizer_conformance`,
  `conformance_cases` and `parametrize_conformance` are its forms for a test suite.

Examples:
    >>> import torch, higher.contrib
    >>> higher.contrib.check_hypergradient(lambda x: (x**2).sum(), [torch.ones(2)]).ok
    True
"""

from ._conformance import ConformanceCase as ConformanceCase
from ._conformance import optimizer_conformance_report as optimizer_conformance_report
from ._conformance_pytest import check_optimizer_conformance as check_optimizer_conformance
from ._conformance_pytest import conformance_cases as conformance_cases
from ._conformance_pytest import parametrize_conformance as parametrize_conformance
from ._conformance_report import CheckResult as CheckResult
from ._conformance_report import ConformanceFailure as ConformanceFailure
from ._conformance_report import ConformanceReport as ConformanceReport
from ._conformance_report import Tolerances as Tolerances
from ._cudnn import cudnn_safe as cudnn_safe
from ._errors import ContribError as ContribError
from ._errors import HigherError as HigherError
from ._hypergrad import GradientEntry as GradientEntry
from ._hypergrad import HypergradientMismatch as HypergradientMismatch
from ._hypergrad import HypergradientReport as HypergradientReport
from ._hypergrad import check_hypergradient as check_hypergradient
from ._hypergrad import hypergradient_report as hypergradient_report

__all__ = [
    "cudnn_safe",
    "check_hypergradient",
    "hypergradient_report",
    "HypergradientReport",
    "GradientEntry",
    "check_optimizer_conformance",
    "optimizer_conformance_report",
    "conformance_cases",
    "parametrize_conformance",
    "ConformanceCase",
    "ConformanceReport",
    "CheckResult",
    "Tolerances",
    "HypergradientMismatch",
    "ConformanceFailure",
    "ContribError",
    "HigherError",
]
