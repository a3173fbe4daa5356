"""Per-element learning rates (a tensor shaped like its parameter in each one-parameter group,
as 0.2.1 ran them) through every way the core runs an unroll: the memory modes, batched tasks
and the meta-step give the full unroll's numbers and hypergradients."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import higher

T = torch.Tensor
STEPS = 3


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def setup() -> tuple[torch.nn.Module, list[T], T, T]:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    rates = [(0.05 + 0.1 * torch.rand(p.shape)).requires_grad_() for p in model.parameters()]
    return model, rates, torch.randn(4, 8, 5), torch.randn(4, 8, 3)


def opt_with(model: torch.nn.Module, rates: list[T]) -> torch.optim.Optimizer:
    opt = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.1, momentum=0.9)
    for group, rate in zip(opt.param_groups, rates, strict=True):
        group["lr"] = rate
    return opt


def loss_of(fmodel: torch.nn.Module, x: T, y: T) -> T:
    return F.mse_loss(fmodel(x), y)


def per_task(model: torch.nn.Module, rates: list[T], xs: T, ys: T, **kwargs: Any) -> list[T]:
    """The validation loss of each task after STEPS steps, one innerloop_ctx per task."""
    losses = []
    for x, y in zip(xs, ys, strict=True):
        with higher.innerloop_ctx(model, opt_with(model, rates), **kwargs) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(closure=functools.partial(loss_of, fmodel, x, y))
            losses.append(F.mse_loss(fmodel(x), y))
    return losses


def check(losses: T, expected: T, rates: list[T]) -> None:
    got = torch.autograd.grad(losses.sum(), rates, retain_graph=True)
    want = torch.autograd.grad(expected.sum(), rates, retain_graph=True)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and b.abs().min() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["recompute", "truncated", "forward"])
def test_memory_modes_equal_the_full_unroll(mode: str) -> None:
    model, rates, xs, ys = setup()
    unroll: Any = {
        "recompute": "recompute",
        "truncated": higher.Truncated(window=STEPS),
        "forward": higher.ForwardMode(wrt=rates),
    }[mode]
    losses = torch.stack(per_task(model, rates, xs, ys, unroll=unroll))
    check(losses, torch.stack(per_task(model, rates, xs, ys)), rates)


def test_batched_tasks_and_meta_step_equal_one_loop_per_task() -> None:
    model, rates, xs, ys = setup()
    expected = torch.stack(per_task(model, rates, xs, ys))
    mse = torch.vmap(F.mse_loss)
    with higher.batched_innerloop_ctx(model, opt_with(model, rates), tasks=4) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(mse(fmodel(xs), ys))
        check(mse(fmodel(xs), ys), expected, rates)
    inner = lambda m, x, y: F.mse_loss(m(x), y)  # noqa: E731
    meta = higher.compile_meta_step(inner, inner, steps=STEPS, tasks=4, compile=False)
    check(meta(model, opt_with(model, rates), xs, ys), expected, rates)
