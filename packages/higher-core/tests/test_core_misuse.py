"""Misuses a user makes, each refused with an error that says what was wrong and what was
expected (the class: a `higher.HigherError` and the builtin 0.2.1 raised), never a silent wrong
result or an error from deep inside torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher
from higher.optim import internal


class World(NamedTuple):
    model: nn.Module
    opt: torch.optim.Optimizer
    fmodel: Any
    diffopt: Any
    x: torch.Tensor
    y: torch.Tensor


def world() -> World:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fmodel = higher.patch.monkeypatch(model)
    diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    return World(model, opt, fmodel, diffopt, torch.randn(5, 3), torch.randn(5, 1))


def loss(w: World) -> torch.Tensor:
    return F.mse_loss(w.fmodel(w.x), w.y)


def _ctx(*args: Any, **kwargs: Any) -> Any:
    with higher.innerloop_ctx(*args, **kwargs):
        pass


OptimError = higher.optim.OptimError
TypeErr = higher.optim.ArgumentTypeError
HyperErr = higher.optim.HyperparameterTypeError
PatchError = higher.patch.PatchError

# (what, misuse, expected error class, message that says what was wrong and what was expected)
MISUSES: list[tuple[str, Callable[[World], Any], type[Exception] | None, str]] = [
    # innerloop_ctx and the top level
    ("model not a module", lambda w: _ctx("net", w.opt), higher.UsageError, "torch.nn.Module"),
    ("opt not an optimizer", lambda w: _ctx(w.model, "sgd"), higher.UsageError, "Optimizer"),
    (
        "opt over other params",
        lambda w: _ctx(w.model, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)),
        OptimError,
        "not among reference_params",
    ),
    (
        "non-bool copy flag",
        lambda w: _ctx(w.model, w.opt, copy_initial_weights="yes"),
        PatchError,
        "must be bools",
    ),
    ("bad device", lambda w: _ctx(w.model, w.opt, device=3.5), PatchError, "device must be"),
    (
        "override not a dict",
        lambda w: _ctx(w.model, w.opt, override=[0.1]),
        HyperErr,
        "override must be a dict",
    ),
    (
        "override unknown key",
        lambda w: _ctx(w.model, w.opt, override={"lrr": [0.1]}),
        OptimError,
        "'lrr' is not a hyperparameter",
    ),
    (
        "override not a list",
        lambda w: _ctx(w.model, w.opt, override={"lr": 0.1}),
        HyperErr,
        "must be a list of values",
    ),
    (
        "override too many",
        lambda w: _ctx(w.model, w.opt, override={"lr": [0.1, 0.2]}),
        OptimError,
        "expected 1, the value for the optimizer.s single param group",
    ),
    (
        "override wrong type",
        lambda w: _ctx(w.model, w.opt, override={"lr": ["fast"]}),
        HyperErr,
        "'lr' must be a number",
    ),
    (
        "override lr 2-d tensor",
        lambda w: _ctx(w.model, w.opt, override={"lr": [torch.ones(2, 2)]}),
        HyperErr,
        "expected one value",
    ),
    (
        "override flag not bool",
        lambda w: _ctx(w.model, w.opt, override={"nesterov": [1]}),
        HyperErr,
        "'nesterov' must be a bool",
    ),
    (
        "unsupported optimizer",
        lambda w: _ctx(w.model, torch.optim.LBFGS(w.model.parameters())),
        higher.optim.UnsupportedOptimizerError,
        "LBFGS",
    ),
    (
        "unknown option",
        lambda w: _ctx(w.model, _with_option(w.opt, "stable", True)),
        higher.optim.UnsupportedOptionError,
        r"\['stable'\]",
    ),
    (
        "same tensor twice",
        lambda w: higher.get_diff_optim(_twice(w), [w.x.requires_grad_()]),
        OptimError,
        "same tensor as parameter 0",
    ),
    # diffopt.step
    ("loss not scalar", lambda w: w.diffopt.step(w.fmodel(w.x)), OptimError, "scalar tensor"),
    ("loss not a tensor", lambda w: w.diffopt.step(1.0), OptimError, "scalar tensor"),
    (
        "loss without grad",
        lambda w: w.diffopt.step(torch.tensor(1.0)),
        OptimError,
        "does not require grad",
    ),
    (
        "loss of the original model",
        lambda w: w.diffopt.step(F.mse_loss(w.model(w.x), w.y)),
        OptimError,
        "original model's parameters",
    ),
    ("stale loss", lambda w: _stale(w), OptimError, "an earlier step"),
    (
        "params too few",
        lambda w: w.diffopt.step(loss(w), params=w.fmodel.fast_params[:2]),
        OptimError,
        "got 2 parameters; expected 4",
    ),
    (
        "params wrong shape",
        lambda w: w.diffopt.step(
            loss(w), params=[p.t() if p.dim() == 2 else p for p in w.fmodel.fast_params]
        ),
        OptimError,
        r"shape \(3, 4\); expected \(4, 3\)",
    ),
    (
        "params wrong dtype",
        lambda w: w.diffopt.step(loss(w), params=[p.double() for p in w.fmodel.fast_params]),
        OptimError,
        "dtype torch.float64; expected torch.float32",
    ),
    (
        "params not tensors",
        lambda w: w.diffopt.step(loss(w), params=[1, 2, 3, 4]),
        TypeErr,
        "params\\[0\\] must be a tensor",
    ),
    (
        "unknown step keyword",
        lambda w: w.diffopt.step(loss(w), lr=0.1),
        TypeErr,
        "unexpected keyword",
    ),
    (
        "callback returns None",
        lambda w: w.diffopt.step(loss(w), grad_callback=lambda g: None),
        OptimError,
        "must return a list of gradients",
    ),
    (
        "callback returns scalars",
        lambda w: w.diffopt.step(loss(w), grad_callback=lambda gs: [torch.tensor(0.0) for _ in gs]),
        OptimError,
        r"gradient 0 has shape \(\)",
    ),
    (
        "callback drops one",
        lambda w: w.diffopt.step(loss(w), grad_callback=lambda gs: gs[1:]),
        OptimError,
        "returned 3 gradients; expected 4",
    ),
    (
        "callback drops a gradient",
        lambda w: w.diffopt.step(loss(w), grad_callback=lambda gs: [None, *gs[1:]]),
        None,
        "",
    ),  # a None gradient means "no step for it": allowed
    # the step protocol
    (
        "plan stepped wrong length",
        lambda w: internal.plan(w.diffopt, stepped=[True]),
        OptimError,
        "stepped has 1 entries; expected 4",
    ),
    (
        "update with too few grads",
        lambda w: internal.plan(w.diffopt).update(w.fmodel.fast_params, []),
        OptimError,
        "got 0 gradients for 4 parameters",
    ),
    # the functional model
    (
        "forward params too few",
        lambda w: w.fmodel(w.x, params=w.fmodel.fast_params[:1]),
        PatchError,
        "has 1 tensors, expected 4",
    ),
    (
        "forward params a tensor",
        lambda w: w.fmodel(w.x, params=w.fmodel.fast_params[0]),
        PatchError,
        "got a single Tensor",
    ),
    (
        "forward params unknown name",
        lambda w: w.fmodel(w.x, params={"nope": w.x}),
        PatchError,
        "unknown parameter names",
    ),
    (
        "time out of range",
        lambda w: list(w.fmodel.parameters(time=5)),
        PatchError,
        "out of range",
    ),
    (
        "time not an int",
        lambda w: list(w.fmodel.parameters(time=1.0)),
        PatchError,
        "time must be an int",
    ),
    (
        "patch a functional module",
        lambda w: higher.patch.monkeypatch(w.fmodel),
        PatchError,
        "already a functional module",
    ),
    ("move a functional module", lambda w: w.fmodel.double(), PatchError, "cannot be moved"),
    (
        "assign a wrong shape",
        lambda w: setattr(w.fmodel[0], "weight", torch.ones(2)),
        PatchError,
        r"shape \(2,\), expected \(4, 3\)",
    ),
    (
        "track flag not bool",
        lambda w: setattr(w.fmodel, "track_higher_grads", 1),
        PatchError,
        "must be a bool",
    ),
    (
        "stateless without params",
        lambda w: higher.patch.make_functional(w.model)(w.x),
        PatchError,
        "call it with params=",
    ),
    # compile_step and compile_meta_step
    (
        "compile_step compile not a bool",
        lambda w: higher.compile_step(loss, compile="yes"),  # type: ignore[arg-type]
        higher.UsageError,
        r"compile_step\(compile=\.\.\.\) must be True .* or False .*got 'yes'",
    ),
    (
        "compile_meta_step compile not a bool",
        lambda w: higher.compile_meta_step(loss, loss, steps=2, compile=1),  # type: ignore[arg-type]
        higher.UsageError,
        r"compile_meta_step\(compile=\.\.\.\) must be True .* or False .*got 1",
    ),
    (
        "compile_step not callable",
        lambda w: higher.compile_step(3),  # type: ignore[arg-type]
        higher.UsageError,
        "callable",
    ),
]


def _with_option(opt: torch.optim.Optimizer, name: str, value: Any) -> torch.optim.Optimizer:
    opt.param_groups[0][name] = value
    return opt


def _twice(w: World) -> torch.optim.Optimizer:
    import warnings

    with warnings.catch_warnings():  # torch warns of duplicates itself
        warnings.simplefilter("ignore")
        return torch.optim.SGD([w.x.requires_grad_(), w.x], lr=0.1)


def _stale(w: World) -> None:
    stale = loss(w)
    w.diffopt.step(stale)
    w.diffopt.step(stale)


@pytest.mark.parametrize(
    ("misuse", "error", "message"),
    [pytest.param(m, e, s, id=what) for what, m, e, s in MISUSES],
)
def test_a_misuse_is_refused_clearly(
    misuse: Callable[[World], Any], error: type[Exception] | None, message: str
) -> None:
    w = world()
    if error is None:
        misuse(w)  # not a misuse: it works
        return
    with pytest.raises(error, match=message) as info:
        misuse(w)
    assert isinstance(info.value, higher.HigherError)
    assert isinstance(info.value, (ValueError, TypeError))  # what 0.2.1 code catches


def test_the_table_is_large() -> None:
    assert len(MISUSES) >= 40
