"""Every exception and warning a public module exports reports its public path.

A traceback prints `module.QualName: message` from the class's `__module__`, pickle finds the
class again by `__module__` and `__qualname__`, and the docs name it so: each must be a public
module (no `_` in its path) that exports the class under that name.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import traceback
import types
from typing import Any

import pytest
import torch

import higher
import higher.contrib


def _public_modules() -> list[types.ModuleType]:
    found = [higher]
    for info in pkgutil.walk_packages(higher.__path__, "higher."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(importlib.import_module(info.name))
    return found


def _public_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in _public_modules():
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


EXCEPTIONS = _public_exceptions()


class Sloppy(higher.optim.DifferentiableSGD):
    """A twin that never steps: its conformance report fails."""

    def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
        pass


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance as the library raises it (some carry a report or a solver's result)."""
    contrib, implicit = higher.contrib, higher.implicit
    if issubclass(cls, implicit.ConvergenceError | implicit.ConvergenceWarning):
        result = implicit.CG(maxiter=1).solve(lambda v: v * 2, torch.ones(2).double())
        return cls("CG stopped after 1 iteration", result)
    if cls is contrib.HypergradientMismatch:
        wrong = lambda x: (x**2).sum() + (x.detach() ** 2).sum()  # noqa: E731
        return contrib.HypergradientMismatch(contrib.hypergradient_report(wrong, [torch.ones(2)]))
    if cls is contrib.ConformanceFailure:
        report = contrib.optimizer_conformance_report(
            torch.optim.SGD, Sloppy, [{"lr": 0.1}], checks=["steps"]
        )
        return contrib.ConformanceFailure(report)
    if issubclass(cls, implicit.NotStationaryError | implicit.NotStationaryWarning):
        return cls("the point is not stationary", implicit.Stationarity(0.8, 0.4, 1e-3))
    return cls("what was wrong, and what was expected")


def test_every_package_exports_exceptions() -> None:
    modules = {cls.__module__ for cls in EXCEPTIONS.values()}
    assert {"higher", "higher.errors", "higher.patch", "higher.optim", "higher.contrib"} <= modules
    assert {"higher.implicit", "higher.distributed"} <= modules
    assert {higher.UnrollError, higher.optim.OptimError, higher.optim.PluginWarning} <= set(
        EXCEPTIONS.values()
    )


@pytest.mark.parametrize("path", sorted(EXCEPTIONS))
def test_module_is_the_public_path(path: str) -> None:
    cls = EXCEPTIONS[path]
    assert not any(part.startswith("_") for part in cls.__module__.split(".")), path
    module = importlib.import_module(cls.__module__)
    assert getattr(module, cls.__qualname__) is cls
    assert cls.__qualname__ in module.__all__


@pytest.mark.parametrize("path", sorted(EXCEPTIONS))
def test_traceback_prints_the_public_path(path: str) -> None:
    err = _instance(EXCEPTIONS[path])
    assert traceback.format_exception_only(err)[-1].startswith(f"{path}: ")


@pytest.mark.parametrize("path", sorted(EXCEPTIONS))
def test_pickles_by_its_public_path(path: str) -> None:
    cls = EXCEPTIONS[path]
    assert pickle.loads(pickle.dumps(cls)) is cls
    err = _instance(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.args == err.args
    assert str(back) == str(err)
    if isinstance(err, higher.implicit.ConvergenceError | higher.implicit.ConvergenceWarning):
        assert isinstance(back, type(err))
        assert back.result.status == err.result.status
        assert back.result.iterations == err.result.iterations == 1
    if isinstance(err, higher.contrib.HypergradientMismatch | higher.contrib.ConformanceFailure):
        assert isinstance(back, type(err))
        assert back.report.summary() == err.report.summary()
        assert not back.report.ok
