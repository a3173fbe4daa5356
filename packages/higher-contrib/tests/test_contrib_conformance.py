"""The conformance kit passes a right twin and catches each kind of wrong one, saying where."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import higher.optim
from higher.contrib import (
    ConformanceCase,
    ConformanceFailure,
    ContribError,
    Tolerances,
    check_optimizer_conformance,
    conformance_cases,
    optimizer_conformance_report,
    parametrize_conformance,
)

HERE = __name__


class HandAdam(torch.optim.Adam):
    """A torch optimizer of our own, so registrations in these tests touch no built-in."""


def _sqrt(v: torch.Tensor, guarded: bool) -> torch.Tensor:
    if not guarded:
        return v.sqrt()
    positive = v > 0  # sqrt's derivative is infinite at 0: keep 0 out of the graph
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)


class HandTwin(higher.optim.DifferentiableOptimizer):
    """Adam written by hand with the 0.2.1 recipe; each flag plants one bug."""

    eps_before_correction = False  # higher 0.2.1's Adam
    lr_as_float = False  # cuts the graph to a learnable lr
    unguarded_sqrt = False  # NaN hypergradients at zero gradients
    first_group_lr = False  # reads group 0's lr for every group
    ignore_torch_state = False  # starts from zero moments even when torch had stepped
    last_entry_off = False  # one entry of the first parameter is off, the others are right
    leaky_state = False  # counts its calls in place, in the state it was given

    def _import_state(self, torch_state: Any, device: Any) -> dict[str, Any]:
        return {} if self.ignore_torch_state else super()._import_state(torch_state, device)

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        for g, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            beta1, beta2 = group["betas"]
            lr = self.param_groups[0]["lr"] if self.first_group_lr else group["lr"]
            if self.lr_as_float:
                lr = float(lr)
            for j, grad in enumerate(grads):
                if grad is None:
                    continue
                p, state = group["params"][j], self.state[g][j]
                step = state.get("step", 0) + 1
                m = state.get("exp_avg", torch.zeros_like(p)) * beta1 + (1 - beta1) * grad
                v = state.get("exp_avg_sq", torch.zeros_like(p)) * beta2 + (1 - beta2) * grad**2
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                root = _sqrt(v, guarded=not self.unguarded_sqrt)
                if self.eps_before_correction:
                    update = lr * bc2**0.5 / bc1 * m / (root + group["eps"])
                else:
                    update = lr / bc1 * m / (root / bc2**0.5 + group["eps"])
                new = p - update
                if self.last_entry_off and g == 0 and j == 0:
                    bump = torch.zeros_like(new).reshape(-1)
                    bump[-1] = 1e-3
                    new = new + bump.reshape(new.shape)
                group["params"][j] = new
                state.update(step=step, exp_avg=m, exp_avg_sq=v)
                if self.leaky_state:
                    state.setdefault("calls", torch.zeros(())).add_(1)


def planted(**bugs: bool) -> type[HandTwin]:
    return type("Planted", (HandTwin,), bugs)


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    higher.optim.register_optim(HandAdam, HandTwin)


GRID = {"lr": [1e-3, 0.1]}


def test_a_right_twin_passes_every_check() -> None:
    report = check_optimizer_conformance(HandAdam, HandTwin, GRID)
    assert report.ok
    assert [r.label for r in report.results] == [
        "steps [lr=0.001]",
        "hypergradient [lr=0.001]",
        "zero_grad [lr=0.001]",
        "protocol [lr=0.001]",
        "registry",
        "steps [lr=0.1]",
        "hypergradient [lr=0.1]",
        "zero_grad [lr=0.1]",
        "protocol [lr=0.1]",
    ]
    assert str(report) == f"conformance of HandTwin to {HERE}.HandAdam: all 9 checks passed"
    protocol = [r for r in report.results if r.check == "protocol"]
    assert all("a hand-written _update" in r.detail for r in protocol)
    rule_report = check_optimizer_conformance(
        torch.optim.Adam, higher.optim.DifferentiableAdam, [{"lr": 0.1}], checks=["protocol"]
    )
    assert "(a Rule)" in rule_report.results[0].detail


def test_the_builtin_twins_pass() -> None:
    sgd_grid = {"lr": [0.1], "momentum": [0, 0.9], "weight_decay": [0, 0.1]}
    check_optimizer_conformance(torch.optim.SGD, higher.optim.DifferentiableSGD, sgd_grid)
    check_optimizer_conformance(
        torch.optim.Adam, higher.optim.DifferentiableAdam, [{"amsgrad": True, "maximize": True}],
        hyperparameters=["lr", "betas", "weight_decay"],
    )  # fmt: skip
    # ASGD keeps eta in the default dtype: the kit runs under float64, then restores float32
    check_optimizer_conformance(torch.optim.ASGD, higher.optim.DifferentiableASGD, [{"lr": 0.01}])
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize(
    ("bug", "check", "expected"),
    [
        ("eps_before_correction", "steps", r"step 1 of 10: parameter 0 entry \[\d, \d\]: twin"),
        ("first_group_lr", "steps", "step 1 of 10: parameter 1 entry"),
        ("ignore_torch_state", "steps", r"step 6 of 10 \(twin built after torch's step 5\)"),
        ("lr_as_float", "hypergradient", r"1 of 12 numbers differ.*\n.*\n +lr +0\.0+e\+00 "),
        ("unguarded_sqrt", "zero_grad", r"the hypergradient by params\[0\] is not finite"),
        ("lr_as_float", "zero_grad", r"no hypergradient reaches \['lr'\]: the graph is cut"),
        ("leaky_state", "protocol", r"StepPlan\.update changed the optimizer: only commit may"),
    ],
)
def test_each_planted_bug_is_caught_by_its_check(bug: str, check: str, expected: str) -> None:
    twin = planted(**{bug: True})
    higher.optim.register_optim(HandAdam, twin)
    try:
        with warnings.catch_warnings():  # float(lr) of a tensor that requires grad: torch warns
            warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True")
            report = optimizer_conformance_report(HandAdam, twin, GRID, checks=[check])
        with pytest.raises(ConformanceFailure, match=expected) as info:
            report.raise_if_failed()
    finally:
        higher.optim.register_optim(HandAdam, HandTwin)
    assert not report.ok
    assert isinstance(info.value, AssertionError)
    assert info.value.report is report
    assert str(info.value).startswith(f"conformance of Planted to {HERE}.HandAdam: 2 of 2 checks")


def test_the_eps_bug_is_a_small_error_seen_as_such() -> None:
    report = optimizer_conformance_report(
        HandAdam, planted(eps_before_correction=True), [{"lr": 0.1}], checks=["steps"]
    )
    (result,) = report.failures
    assert "rel error" in result.detail
    # sloppier tolerances let it through: the threshold is the user's to set
    loose = optimizer_conformance_report(
        HandAdam, planted(eps_before_correction=True), [{"lr": 0.1}], checks=["steps"],
        tolerances=Tolerances(rtol=1e-3, atol=1e-3),
    )  # fmt: skip
    assert loose.ok


def test_the_report_names_the_worst_entry_not_a_right_one() -> None:
    report = optimizer_conformance_report(
        HandAdam, planted(last_entry_off=True), [{"lr": 0.1}], checks=["steps"]
    )
    (result,) = report.failures
    shape = next(iter(_problem_shapes()))
    last = ", ".join(str(n - 1) for n in shape)
    assert f"parameter 0 entry [{last}]" in result.detail, result.detail
    assert "abs error 1.00e-03" in result.detail


def _problem_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes the kit's smooth problem uses (read off a passing report's twin)."""
    seen: list[tuple[int, ...]] = []

    class Recording(HandTwin):
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            if not seen:
                seen.extend(tuple(p.shape) for g in self.param_groups for p in g["params"])
            super()._update(grouped_grads, **kwargs)

    optimizer_conformance_report(HandAdam, Recording, [{"lr": 0.1}], checks=["steps"])
    return seen


def test_registry_check_names_the_entry_point_to_declare() -> None:
    class Unknown(torch.optim.Optimizer):
        def __init__(self, params: Any, lr: float = 0.1) -> None:
            super().__init__(params, {"lr": lr})

    report = optimizer_conformance_report(Unknown, HandTwin, checks=["registry"])
    (result,) = report.failures
    assert "UnsupportedOptimizerError" in result.detail
    assert '"higher.optimizers"' in result.detail
    assert f'"{HERE}.test_registry_check_names_the_entry_point_to_declare.<locals>.Unknown"' in (
        result.detail
    )
    # resolves, but to another twin
    report = optimizer_conformance_report(torch.optim.Adam, HandTwin, checks=["registry"])
    assert "gave DifferentiableAdam, not HandTwin" in report.failures[0].detail


def test_options_the_torch_optimizer_refuses_are_reported() -> None:
    report = optimizer_conformance_report(
        torch.optim.SGD,
        higher.optim.DifferentiableSGD,
        [{"lr": 0.1, "nesterov": True}],
        checks=["steps"],
    )
    assert "SGD itself refuses these options: ValueError: Nesterov" in report.failures[0].detail


def test_a_twin_that_raises_is_a_failure_not_a_crash() -> None:
    class Raising(HandTwin):
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            raise RuntimeError("the twin broke")

    report = optimizer_conformance_report(HandAdam, Raising, checks=["steps", "zero_grad"])
    assert [r.detail for r in report.results] == ["raised RuntimeError: the twin broke"] * 2
    assert torch.get_default_dtype() == torch.float32


def test_hyperparameters_must_be_numbers_or_pairs() -> None:
    with pytest.raises(ContribError, match="by 'amsgrad': HandAdam's value is False"):
        optimizer_conformance_report(
            HandAdam, HandTwin, checks=["hypergradient"], hyperparameters=["amsgrad"]
        )


def test_cases_and_grids() -> None:
    cases = conformance_cases(
        HandAdam, HandTwin, {"lr": [0.1, 0.2], "amsgrad": [False]}, checks=["steps", "registry"]
    )
    assert [c.id for c in cases] == [
        "steps-lr=0.1-amsgrad=False",
        "registry",
        "steps-lr=0.2-amsgrad=False",
    ]
    assert all(isinstance(c, ConformanceCase) for c in cases)
    listed = conformance_cases(HandAdam, HandTwin, [{"lr": 0.3}, {}], checks=["zero_grad"])
    assert [c.options for c in listed] == [{"lr": 0.3}, {}]
    assert conformance_cases(HandAdam, HandTwin, [{"lr": 0.3}], checks=["registry"])[0].options == {
        "lr": 0.3
    }
    cases[0].run()  # passes silently


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.optim.SGD, HandTwin), {"checks": ["speed"]}, r"unknown checks \['speed'\]"),
        ((torch.optim.SGD, HandTwin), {"steps": 1}, "expected steps >= 2"),
        ((torch.optim.SGD, HandTwin, {"lr": 0.1}), {}, "non-empty list of values for 'lr'"),
        ((torch.optim.SGD, HandTwin, []), {}, "non-empty list of option dicts"),
        ((torch.nn.Linear, HandTwin), {}, "expected a torch.optim.Optimizer subclass"),
        ((torch.optim.SGD, torch.optim.SGD), {}, "DifferentiableOptimizer subclass"),
    ],
)
def test_bad_input_is_a_clear_error(args: Any, kwargs: Any, match: str) -> None:
    with pytest.raises(ContribError, match=match):
        conformance_cases(*args, **kwargs)


@parametrize_conformance(HandAdam, HandTwin, [{"lr": 0.05}], steps=4)
def test_parametrized_by_the_helper(conformance_case: ConformanceCase) -> None:
    assert conformance_case.steps == 4
    conformance_case.run()


def test_the_helper_makes_one_item_per_case(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sgd.py").write_text(
        "import torch, higher.optim\n"
        "from higher.contrib import parametrize_conformance\n"
        "@parametrize_conformance(torch.optim.SGD, higher.optim.DifferentiableSGD,\n"
        "                         {'lr': [0.1], 'momentum': [0.0, 0.9]}, steps=3,\n"
        "                         checks=['steps', 'zero_grad', 'registry'])\n"
        "def test_sgd(conformance_case):\n"
        "    conformance_case.run()\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 passed" in run.stdout
    for item in ["steps-lr=0.1-momentum=0.0", "registry", "zero_grad-lr=0.1-momentum=0.9"]:
        assert f"test_sgd.py::test_sgd[{item}] PASSED" in run.stdout
