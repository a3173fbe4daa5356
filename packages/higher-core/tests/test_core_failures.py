"""Failures injected anywhere in an inner loop leave the user's model and torch optimizer
bitwise as they were, and leave the functional model and the twin usable."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher


class Boom(RuntimeError):
    pass


def setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    for _ in range(2):  # a stepped torch optimizer: its state must survive untouched
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    """Everything of the user's objects a library could write: bitwise copies."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return tensors, grads, copy.deepcopy(opt.state_dict()), model.training


def assert_unchanged(before: Any, after: Any) -> None:
    (t0, g0, o0, m0), (t1, g1, o1, m1) = before, after
    assert m0 == m1
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert (g0[k] is None) == (g1[k] is None)
        if g0[k] is not None:
            assert torch.equal(g0[k], g1[k])
    assert o0["param_groups"] == o1["param_groups"]
    for i, state in o0["state"].items():
        for key, value in state.items():
            other = o1["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


Injection = Callable[[Any, Any, torch.Tensor, torch.Tensor], None]


def _raise(*_: Any) -> Any:
    raise Boom("injected")


INJECTIONS: dict[str, Injection] = {
    # the user's code raises in the middle of a forward
    "forward": lambda f, d, x, y: f(x.requires_grad_(False)) + _raise(),
    # the loss is computed, the step's gradient callback raises
    "grad_callback": lambda f, d, x, y: d.step(F.mse_loss(f(x), y), grad_callback=_raise),
    # an override that is refused halfway through
    "override": lambda f, d, x, y: d.step(
        F.mse_loss(f(x), y), override={"lr": [0.1], "betas": ["nope"]}
    ),
    # params of the wrong dtype given to step
    "params": lambda f, d, x, y: d.step(
        F.mse_loss(f(x), y), params=[p.float() for p in f.fast_params]
    ),
    # weights of the wrong shape given to the forward
    "forward_params": lambda f, d, x, y: f(x, params=[p[:1] for p in f.fast_params]),
    # an interrupt (not an Exception) while the backward of the inner gradient runs
    "interrupt": lambda f, d, x, y: d.step(F.mse_loss(f(x), y) + _interrupting(f.fast_params[0])),
    # a meta-loss backward that raises half way
    "meta_backward": lambda f, d, x, y: (
        F.mse_loss(f(x), y) + _interrupting(f.fast_params[0], Boom)
    ).backward(),
}


def _interrupting(t: torch.Tensor, kind: type[BaseException] = KeyboardInterrupt) -> torch.Tensor:
    """Zero, whose backward raises `kind`."""

    class Raise(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.sum() * 0

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            raise kind("injected")

    out: torch.Tensor = Raise.apply(t)  # type: ignore[no-untyped-call]
    return out


@pytest.mark.parametrize("where", INJECTIONS)
@pytest.mark.parametrize("copy_initial_weights", [True, False])
def test_an_injected_failure_changes_nothing_of_the_users(
    where: str, copy_initial_weights: bool
) -> None:
    model, opt, x, y = setup()
    before = fingerprint(model, opt)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights) as (f, d):
        d.step(F.mse_loss(f(x), y))
        history = len(list(f.parameters(time=1)))
        state = [{j: dict(slot) for j, slot in gs.items()} for gs in d.state]
        options = [{k: v for k, v in g.items() if k != "params"} for g in d.param_groups]
        with pytest.raises((Boom, KeyboardInterrupt, higher.HigherError, TypeError)):
            INJECTIONS[where](f, d, x, y)
        # the twin is as it was (for the failures inside a step) and both keep working
        if where not in ("forward", "meta_backward"):
            now = [{j: dict(slot) for j, slot in gs.items()} for gs in d.state]
            assert [{j: {k: id(v) for k, v in s.items()} for j, s in gs.items()} for gs in now] == [
                {j: {k: id(v) for k, v in s.items()} for j, s in gs.items()} for gs in state
            ]  # the very same state tensors: nothing was written
            assert [{k: v for k, v in g.items() if k != "params"} for g in d.param_groups] == (
                options
            )
            assert len(list(f.parameters(time=-1))) == history
            with pytest.raises(higher.HigherError):
                next(f.parameters(time=2))
        d.step(F.mse_loss(f(x), y))
        F.mse_loss(f(x), y).backward() if not copy_initial_weights else None
    if copy_initial_weights:
        assert_unchanged(before, fingerprint(model, opt))
    else:  # the meta-gradient reaches the model, as asked; nothing else of it changes
        after = fingerprint(model, opt)
        assert all(p.grad is not None for p in model.parameters())
        assert_unchanged(before, (after[0], before[1], after[2], after[3]))


def test_a_failing_compiled_step_changes_nothing() -> None:
    model, opt, x, y = setup()
    model.eval()  # compile_step runs BatchNorm with running statistics only
    before = fingerprint(model, opt)
    step = higher.compile_step(lambda m, x, y: F.mse_loss(m(x), y) + _raise(), compile=False)
    with higher.innerloop_ctx(model, opt) as (f, d), pytest.raises(Boom):
        step(f, d, x, y)
    assert_unchanged(before, fingerprint(model, opt))


def test_an_inner_loop_pickles_and_continues_the_same() -> None:
    """`pickle` of the pair mid-loop (the graph cannot be saved: tensors come back detached)."""
    import pickle

    model, opt, x, y = setup()
    with higher.innerloop_ctx(model, opt) as (f, d):
        d.step(F.mse_loss(f(x), y))
        f2, d2 = pickle.loads(pickle.dumps((f, d)))
        assert d2.fmodel is f2  # the pair stays a pair
        for a, b in zip(d.step(F.mse_loss(f(x), y)), d2.step(F.mse_loss(f2(x), y)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        clone_f, clone_d = copy.deepcopy((f, d))
        assert clone_d.fmodel is clone_f
