"""The conformance kit: a differentiable optimizer against its torch original, check by check.

Five checks, each on small float64 problems with two param groups:

- `steps`: the twin's steps equal torch's, step for step (also first order, and resumed from a
  torch optimizer that already stepped, so its state carries over);
- `hypergradient`: the meta-gradient by the hyperparameters and the initial parameters equals
  float64 central differences;
- `zero_grad`: exactly-zero and missing gradients give finite steps and finite hypergradients
  (and the same steps as torch);
- `protocol`: the step protocol holds, for a twin written as a `Rule` and for one with a
  hand-written `_update` alike: `plan` changes nothing, `StepPlan.update` is pure (two runs
  agree and change nothing), a refused step changes nothing, `commit` gives what `step` gives;
- `registry`: `higher.optim.get_diff_optim` resolves the torch optimizer (and a subclass of it)
  to the twin: a plugin's entry point works.

`optimizer_conformance_report` is the kit's one entry point: it runs the checks and returns the
report. The test-suite forms of it (`conformance_cases`, `parametrize_conformance`,
`check_optimizer_conformance`) are in `_conformance_pytest.py`; the report types in
`_conformance_report.py`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from higher.errors import HigherError
from higher.optim import DifferentiableOptimizer, get_diff_optim, internal

from ._conformance_report import CheckResult, ConformanceReport, Tolerances
from ._errors import ContribError
from ._hypergrad import _unravel, hypergradient_report

TorchOptimizer = type[torch.optim.Optimizer]
DiffOptimizer = type[DifferentiableOptimizer]
Options = Mapping[str, Any]
OptionGrid = Mapping[str, Any] | Sequence[Options]  # a grid {name: [values]}, or option sets

CHECKS = ("steps", "hypergradient", "zero_grad", "protocol", "registry")
T = torch.Tensor


@dataclass(frozen=True)
class ConformanceCase:
    """One check on one option set: what a parametrized test runs (`case.run()`).

    Examples:
        >>> import torch, higher.optim, higher.contrib
        >>> (case,) = higher.contrib.conformance_cases(
        ...     torch.optim.SGD, higher.optim.DifferentiableSGD, [{"lr": 0.1}], checks=["steps"]
        ... )
        >>> case.id, case.result().ok
        ('steps-lr=0.1', True)
    """

    torch_optimizer: TorchOptimizer
    diff_optimizer: DiffOptimizer
    check: str
    options: Mapping[str, Any]
    steps: int = 10
    hyperparameters: tuple[str, ...] | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)

    @property
    def id(self) -> str:
        """A pytest id: `check-option=value-...` (`registry` alone: it runs once)."""
        if self.check == "registry":
            return self.check
        return "-".join([self.check, *(f"{k}={v}" for k, v in self.options.items())])

    def result(self) -> CheckResult:
        """Run the check (under a float64 default dtype); raises only for invalid input."""
        try:
            self.torch_optimizer([torch.zeros(1, requires_grad=True)], **self.options)
        except Exception as err:
            detail = f"{self.torch_optimizer.__name__} itself refuses these options: {_brief(err)}"
            return CheckResult(self.check, dict(self.options), False, detail)
        # float64 throughout, also for the scalar state torch keeps in the default dtype
        # (ASGD's eta, NAdam's mu_product): else finite differences see float32 rounding.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            ok, detail = _CHECKS[self.check](self)
        except ContribError:
            raise
        except Exception as err:  # the twin raised: that is the finding
            ok, detail = False, f"raised {_brief(err)}"
        finally:
            torch.set_default_dtype(previous)
        return CheckResult(self.check, dict(self.options), ok, detail)

    def run(self) -> None:
        """Run the check; raise `ConformanceFailure` if it fails."""
        _report([self.result()], self).raise_if_failed()


def optimizer_conformance_report(
    torch_optimizer: TorchOptimizer,
    diff_optimizer: DiffOptimizer,
    options: OptionGrid = ({},),
    *,
    checks: Iterable[str] = CHECKS,
    steps: int = 10,
    hyperparameters: Iterable[str] | None = None,
    tolerances: Tolerances | None = None,
) -> ConformanceReport:
    """Run the conformance checks of a differentiable twin against its torch optimizer.

    Args:
        torch_optimizer: the `torch.optim.Optimizer` subclass.
        diff_optimizer: its twin, a `higher.optim.DifferentiableOptimizer` subclass.
        options: the option sets to check: a grid `{"lr": [1e-3, 0.1], "maximize": [False,
            True]}` (every combination) or a list of option dicts. Each set is passed to the
            torch optimizer's constructor (`torch_optimizer(params, **options)`).
        checks: which of `steps`, `hypergradient`, `zero_grad`, `protocol`, `registry` to run.
        steps: how many steps each unroll takes (at least 2; 10 by default).
        hyperparameters: the hyperparameters whose hypergradient is checked, each a number or
            a pair of numbers in the optimizer's param groups (default: `lr` where there is
            one); the initial parameters' hypergradient is always checked.
        tolerances: see `Tolerances` (steps: rtol 1e-10; hypergradients: rtol 1e-5).

    Returns:
        A `ConformanceReport`; it never raises for a departure (`check_optimizer_conformance`
        does).

    Examples:
        >>> import torch, higher.optim, higher.contrib
        >>> report = higher.contrib.optimizer_conformance_report(
        ...     torch.optim.SGD, higher.optim.DifferentiableSGD, {"lr": [0.1], "momentum": [0, 0.9]}
        ... )
        >>> report.ok, len(report.results)
        (True, 9)
    """
    cases = _cases(
        torch_optimizer, diff_optimizer, options, checks=checks, steps=steps,
        hyperparameters=hyperparameters, tolerances=tolerances,
    )  # fmt: skip
    return _report([c.result() for c in cases], cases[0])


# -- the problems ------------------------------------------------------------------------------


@dataclass
class _Problem:
    """Parameters in two groups, a training loss per step and a meta-loss (all float64)."""

    init: list[T]
    groups: list[list[int]]
    train: Callable[[int, Sequence[T]], T]
    meta: Callable[[Sequence[T]], T]

    def group_dicts(self, params: Sequence[T]) -> list[dict[str, Any]]:
        return [{"params": [params[i] for i in g]} for g in self.groups]


def _smooth_problem(steps: int) -> _Problem:
    gen = torch.Generator().manual_seed(0)

    def rand(shape: tuple[int, ...]) -> T:
        return torch.randn(shape, dtype=torch.float64, generator=gen)

    shapes = [(3, 2), (4,), ()]
    init = [rand(s) for s in shapes]
    scale = [rand(s).abs() + 0.5 for s in shapes]
    targets = [[rand(s) for s in shapes] for _ in range(steps)]
    weights = [rand(s) for s in shapes]

    def train(t: int, params: Sequence[T]) -> T:
        terms = [(s * (p - y) ** 2).sum() for p, s, y in zip(params, scale, targets[t])]
        coupling = torch.sin(params[0].sum() * params[1][0]) + params[2] * params[1].sum()
        return torch.stack(terms).sum() + coupling

    def meta(params: Sequence[T]) -> T:
        return torch.stack([(w * torch.sin(p)).sum() + 0.1 * (p**2).sum() for p, w in
                            zip(params, weights)]).sum()  # fmt: skip

    return _Problem(init, [[0, 2], [1]], train, meta)


def _zero_grad_problem(steps: int) -> _Problem:
    # z: gradient exactly zero throughout (at the minimum of z**2); h: the last two entries get
    # exactly-zero gradients; u: unused by the loss (its gradient is None; torch skips it).
    gen = torch.Generator().manual_seed(1)
    init = [
        torch.zeros(3, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64, generator=gen),
        torch.randn(2, dtype=torch.float64, generator=gen),
    ]
    targets = [torch.randn(2, dtype=torch.float64, generator=gen) for _ in range(steps)]

    def train(t: int, params: Sequence[T]) -> T:
        z, h, _ = params
        return (z**2).sum() + ((h[:2] - targets[t]) ** 2).sum()

    def meta(params: Sequence[T]) -> T:
        return torch.stack([(p + p**2).sum() for p in params]).sum()

    return _Problem(init, [[0, 1], [2]], train, meta)


# -- the checks --------------------------------------------------------------------------------


def _torch_opt(
    case: ConformanceCase, problem: _Problem, params: Sequence[T]
) -> torch.optim.Optimizer:
    opt = case.torch_optimizer(problem.group_dicts(params), **case.options)
    lr = opt.param_groups[-1].get("lr")
    if isinstance(lr, float) and len(opt.param_groups) > 1:
        opt.param_groups[-1]["lr"] = lr * 0.5  # groups differ: a mixed-up group shows
    return opt


def _torch_step(opt: torch.optim.Optimizer, loss: T) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()


def _leaves(tensors: Iterable[T]) -> list[T]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _compare(got: Sequence[T], want: Sequence[T], tol: Tolerances) -> str:
    """'' when equal within tolerance, else which parameter differs and by how much."""
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach(), w.detach()
        diff = (g - w).abs()
        bad = ~(diff <= tol.atol + tol.rtol * w.abs())
        if bad.any():
            # the worst entry out of tolerance (a NaN counts as the worst of all)
            ranked = torch.where(bad, diff.double().nan_to_num(math.inf), -1.0)
            k = int(torch.argmax(ranked).item())
            twin, torch_value, err = (x.reshape(-1)[k].item() for x in (g, w, diff))
            rel = err / max(abs(torch_value), 1e-300)
            entry = ", ".join(map(str, _unravel(k, g.shape)))
            return (
                f"parameter {i} entry [{entry}]: twin {twin:.17g}, torch {torch_value:.17g} "
                f"(abs error {err:.2e}, rel error {rel:.2e}; rtol={tol.rtol:g}, atol={tol.atol:g})"
            )
    return ""


def _check_steps(case: ConformanceCase) -> tuple[bool, str]:
    problem = _smooth_problem(case.steps)
    tol = case.tolerances
    ref = _leaves(problem.init)
    opt = _torch_opt(case, problem, ref)
    source_params = _leaves(problem.init)
    twin = case.diff_optimizer(_torch_opt(case, problem, source_params), source_params)
    first_order = case.diff_optimizer(
        _torch_opt(case, problem, source_params), source_params, track_higher_grads=False
    )
    fast, fast1 = _leaves(problem.init), _leaves(problem.init)
    resume_at = case.steps // 2
    resumed: DifferentiableOptimizer | None = None
    fast_resumed: list[T] = []
    for t in range(case.steps):
        if t == resume_at:  # a twin built from a torch optimizer that already stepped
            resumed = case.diff_optimizer(opt, ref)
            fast_resumed = _leaves(ref)
        _torch_step(opt, problem.train(t, ref))
        fast = twin.step(problem.train(t, fast), params=fast)
        fast1 = first_order.step(problem.train(t, fast1), params=fast1)
        runs = [("", fast), (" (track_higher_grads=False)", fast1)]
        if resumed is not None:
            fast_resumed = resumed.step(problem.train(t, fast_resumed), params=fast_resumed)
            runs.append((f" (twin built after torch's step {resume_at})", fast_resumed))
        for label, got in runs:
            where = _compare(got, ref, tol)
            if where:
                return False, f"step {t + 1} of {case.steps}{label}: {where}"
        if not all(p.requires_grad and p.grad_fn is not None for p in fast):
            return False, f"step {t + 1}: the new parameters carry no graph"
    return True, f"{case.steps} steps equal torch's (also first order, and resumed)"


def _hyper_inputs(case: ConformanceCase, opt: torch.optim.Optimizer) -> dict[str, T]:
    names = case.hyperparameters
    if names is None:
        names = ("lr",) if "lr" in opt.defaults else ()
    inputs: dict[str, T] = {}
    for name in names:
        value = opt.param_groups[0].get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            inputs[name] = torch.tensor(float(value), dtype=torch.float64)
        elif isinstance(value, (tuple, list)) and value and all(_is_number(v) for v in value):
            for k, v in enumerate(value):
                inputs[f"{name}[{k}]"] = torch.tensor(float(v), dtype=torch.float64)
        else:
            raise ContribError(
                f"cannot check the hypergradient by {name!r}: "
                f"{case.torch_optimizer.__name__}'s value is {value!r}; expected a number or a "
                "tuple of numbers"
            )
    return inputs


def _override(inputs: Mapping[str, T], n_params: int) -> tuple[dict[str, list[Any]], list[T]]:
    """Split the checked inputs into an `override` dict and the initial parameters."""
    override: dict[str, list[Any]] = {}
    pairs: dict[str, list[T]] = {}
    for key, value in inputs.items():
        if key.startswith("params["):
            continue
        if key.endswith("]"):  # one member of a pair such as betas
            pairs.setdefault(key.split("[")[0], []).append(value)
        else:
            override[key] = [value]
    override.update({name: [tuple(values)] for name, values in pairs.items()})
    return override, [inputs[f"params[{i}]"] for i in range(n_params)]


def _check_hypergradient(case: ConformanceCase) -> tuple[bool, str]:
    problem = _smooth_problem(case.steps)
    hypers = _hyper_inputs(case, _torch_opt(case, problem, _leaves(problem.init)))
    inputs = {**hypers, **{f"params[{i}]": p for i, p in enumerate(problem.init)}}

    def meta_loss(**given: T) -> T:
        override, params = _override(given, len(problem.init))
        placeholders = _leaves(problem.init)
        opt = _torch_opt(case, problem, placeholders)
        twin = case.diff_optimizer(opt, placeholders, override=override or None)
        for t in range(case.steps):
            params = twin.step(problem.train(t, params), params=params)
        return problem.meta(params)

    tol = case.tolerances
    report = hypergradient_report(
        meta_loss, inputs, rtol=tol.fd_rtol, atol=tol.fd_atol, max_entries=8
    )
    if not report.ok:
        return False, report.summary()
    return True, report.summary()


def _check_zero_grad(case: ConformanceCase) -> tuple[bool, str]:
    problem = _zero_grad_problem(case.steps)
    ref = _leaves(problem.init)
    opt = _torch_opt(case, problem, ref)
    placeholders = _leaves(problem.init)
    source = _torch_opt(case, problem, placeholders)
    hypers = {k: v.requires_grad_() for k, v in _hyper_inputs(case, source).items()}
    override, _ = _override(hypers, 0)
    twin = case.diff_optimizer(source, placeholders, override=override or None)
    init = _leaves(problem.init)
    fast = list(init)
    for t in range(case.steps):
        _torch_step(opt, problem.train(t, ref))
        fast = twin.step(problem.train(t, fast), params=fast)
        for i, p in enumerate(fast):
            if not torch.isfinite(p).all():
                return False, f"step {t + 1}: parameter {i} is not finite: {p.tolist()}"
    grads = torch.autograd.grad(problem.meta(fast), [*init, *hypers.values()], allow_unused=True)
    names = [f"params[{i}]" for i in range(len(init))] + list(hypers)
    for name, grad in zip(names, grads):
        if grad is not None and not torch.isfinite(grad).all():
            return False, f"the hypergradient by {name} is not finite: {grad.tolist()}"
    if hypers and all(g is None for g in grads[len(init) :]):
        return False, f"no hypergradient reaches {list(hypers)}: the graph is cut"
    where = _compare(fast, ref, case.tolerances)
    if where:
        return False, f"after {case.steps} steps with zero gradients: {where}"
    return True, "finite steps and hypergradients at exactly-zero and missing gradients"


def _snapshot(twin: DifferentiableOptimizer) -> list[Any]:
    """What a step may change, comparable with `_same`: each group's options and state."""

    def kept(value: Any) -> Any:  # a copy: a later in-place change must show
        return value.detach().clone() if isinstance(value, T) else value

    groups = [{k: kept(v) for k, v in g.items() if k != "params"} for g in twin.param_groups]
    states = [
        {j: {k: kept(v) for k, v in slot.items()} for j, slot in gs.items()} for gs in twin.state
    ]
    return [groups, states]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, T) or isinstance(b, T):
        return isinstance(a, T) and isinstance(b, T) and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _check_protocol(case: ConformanceCase) -> tuple[bool, str]:
    problem = _smooth_problem(3)
    params = _leaves(problem.init)
    twin = case.diff_optimizer(_torch_opt(case, problem, params), params)
    twin_too = case.diff_optimizer(_torch_opt(case, problem, params), params)
    fast = twin.step(problem.train(0, params), params=params)  # some state to keep unchanged
    twin_too.step(problem.train(0, params), params=params)
    before = _snapshot(twin)
    loss = problem.train(1, fast)
    grads = list(torch.autograd.grad(loss, fast, create_graph=True, allow_unused=True))
    plan = internal.plan(twin, fast, stepped=[g is not None for g in grads])
    if not _same(_snapshot(twin), before):
        return False, "plan changed the optimizer (its options or state): only commit may"
    first, again = plan.update(fast, grads), plan.update(fast, grads)
    if not _same(first.params, again.params) or not _same(list(first.states), list(again.states)):
        return False, "StepPlan.update is not pure: two runs of one plan gave different results"
    if not _same(_snapshot(twin), before):
        return False, "StepPlan.update changed the optimizer: only commit may"
    try:
        twin.step(loss, params=fast, override={"no_such_option": [1.0]})
    except HigherError:
        pass
    else:
        return False, "a step with an override of an unknown option was accepted"
    if not _same(_snapshot(twin), before):
        return False, "a refused step (an unknown override) changed the optimizer"
    committed = internal.commit(twin, plan, first)
    stepped = twin_too.step(problem.train(1, fast), params=fast)
    where = _compare(committed, stepped, case.tolerances)
    if where:
        return False, f"plan, update and commit differ from step: {where}"
    kind = "a Rule" if plan.rule is not None else "a hand-written _update"
    return True, f"plan changes nothing, update is pure, a refused step changes nothing ({kind})"


def _check_registry(case: ConformanceCase) -> tuple[bool, str]:
    problem = _smooth_problem(2)
    params = _leaves(problem.init)
    sub = type(f"{case.torch_optimizer.__name__}Subclass", (case.torch_optimizer,), {})
    for cls in (case.torch_optimizer, sub):
        opt = cls(problem.group_dicts(params), **case.options)
        try:
            twin = get_diff_optim(opt, params)
        except Exception as err:
            name = f"{case.torch_optimizer.__module__}.{case.torch_optimizer.__qualname__}"
            return False, (
                f"higher.optim.get_diff_optim({cls.__name__}(...)) raised "
                f"{type(err).__name__}: {err}\n(declare the entry point "
                f'[project.entry-points."higher.optimizers"] "{name}" = '
                f'"your_module:{case.diff_optimizer.__name__}", install the distribution, '
                "or call higher.optim.register_optim)"
            )
        if type(twin) is not case.diff_optimizer:
            return False, (
                f"higher.optim.get_diff_optim({cls.__name__}(...)) gave "
                f"{type(twin).__qualname__}, not {case.diff_optimizer.__qualname__}"
            )
    return True, "get_diff_optim resolves the optimizer and a subclass of it to the twin"


_CHECKS: dict[str, Callable[[ConformanceCase], tuple[bool, str]]] = {
    "steps": _check_steps,
    "hypergradient": _check_hypergradient,
    "zero_grad": _check_zero_grad,
    "protocol": _check_protocol,
    "registry": _check_registry,
}


def _cases(
    torch_optimizer: TorchOptimizer,
    diff_optimizer: DiffOptimizer,
    options: OptionGrid = ({},),
    *,
    checks: Iterable[str] = CHECKS,
    steps: int = 10,
    hyperparameters: Iterable[str] | None = None,
    tolerances: Tolerances | None = None,
) -> list[ConformanceCase]:
    """Every (check, option set) pair as a `ConformanceCase` (see `conformance_cases`)."""
    _check_classes(torch_optimizer, diff_optimizer)
    wanted = list(checks)
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown or not wanted:
        raise ContribError(f"unknown checks {unknown}; expected some of {list(CHECKS)}")
    if steps < 2:
        raise ContribError(f"expected steps >= 2, got {steps}")
    grid = _option_sets(options)
    hypers = None if hyperparameters is None else tuple(hyperparameters)
    tol = tolerances or Tolerances()
    cases = []
    for i, opts in enumerate(grid):
        for check in wanted:
            if check == "registry" and i > 0:
                continue
            cases.append(
                ConformanceCase(
                    torch_optimizer,
                    diff_optimizer,
                    check,
                    opts,
                    steps,
                    hypers,
                    tol,
                )
            )
    return cases


# -- inputs --------------------------------------------------------------------------------------


def _brief(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [""]
    more = " ..." if len(lines) > 4 else ""
    return f"{type(err).__name__}: " + "\n".join(lines[:4]) + more


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_classes(torch_optimizer: object, diff_optimizer: object) -> None:
    if not (
        isinstance(torch_optimizer, type) and issubclass(torch_optimizer, torch.optim.Optimizer)
    ):
        raise ContribError(f"expected a torch.optim.Optimizer subclass, got {torch_optimizer!r}")
    if not (
        isinstance(diff_optimizer, type) and issubclass(diff_optimizer, DifferentiableOptimizer)
    ):
        raise ContribError(
            f"expected a higher.optim.DifferentiableOptimizer subclass, got {diff_optimizer!r}"
        )


def _option_sets(options: OptionGrid) -> list[dict[str, Any]]:
    if isinstance(options, Mapping):
        for name, values in options.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ContribError(
                    f"options grid: expected a non-empty list of values for {name!r}, got "
                    f"{values!r}"
                )
        names = list(options)
        return [dict(zip(names, combo)) for combo in itertools.product(*options.values())]
    sets = list(options)
    if not sets or not all(isinstance(s, Mapping) for s in sets):
        raise ContribError(
            "expected options as a grid {name: [values]} or a non-empty list of option dicts, "
            f"got {options!r}"
        )
    return [dict(s) for s in sets]


def _report(results: list[CheckResult], case: ConformanceCase) -> ConformanceReport:
    t = case.torch_optimizer
    return ConformanceReport(
        f"{t.__module__}.{t.__qualname__}", case.diff_optimizer.__qualname__, tuple(results)
    )
