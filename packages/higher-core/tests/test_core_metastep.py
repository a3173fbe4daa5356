"""`higher.compile_meta_step`: the whole meta-step (compiled, or as a loop) equals the
innerloop_ctx loop in float64 — meta-gradient and learning-rate hypergradient, one task or many —
and refuses what it cannot run, on every torch (older ones: the compiled form is refused)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher
from higher._compiled import torch_version

COMPILES = torch_version() >= (2, 13)
BACKEND = "aot_eager"  # dynamo + AOTAutograd, what inductor compiles, in seconds
TASKS, STEPS = 3, 4


def mse(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TASKS, 5, 2, generator=g, dtype=torch.float64)
    return x, torch.randn(TASKS, 5, 1, generator=g, dtype=torch.float64)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
}


def reference(name: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """d(sum of the tasks' meta-losses) / d(initial weights, lr), by innerloop_ctx."""
    model = mlp()
    lr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    opt = OPTIMIZERS[name](model.parameters())
    total = torch.zeros((), dtype=torch.float64)
    for t in range(TASKS):
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, override={"lr": [lr]}
        ) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(mse(fmodel, x[t], y[t]))
            total = total + mse(fmodel, x[t], y[t])
    return list(torch.autograd.grad(total, [*model.parameters(), lr]))


def meta_gradient(
    meta: higher.MetaStep, name: str, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    model = mlp()
    lr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    opt = OPTIMIZERS[name](model.parameters())
    if meta.tasks is None:
        losses = [meta(model, opt, x[t], y[t], override={"lr": [lr]}) for t in range(TASKS)]
        total = torch.stack(losses).sum()
    else:
        total = meta(model, opt, x, y, override={"lr": [lr]}).sum()
    return list(torch.autograd.grad(total, [*model.parameters(), lr]))


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tasks", [None, TASKS])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_loop_form_equals_innerloop_ctx(name: str, tasks: int | None) -> None:
    x, y = data()
    meta = higher.compile_meta_step(mse, mse, steps=STEPS, tasks=tasks, compile=False)
    assert_close(meta_gradient(meta, name, x, y), reference(name, x, y))


@pytest.mark.parametrize(("name", "tasks"), [("sgd-momentum", TASKS), ("adam", None)])
def test_the_compiled_form_equals_innerloop_ctx(name: str, tasks: int | None) -> None:
    x, y = data()
    if not COMPILES:
        with pytest.raises(higher.FastPathError, match=r"needs torch >= 2\.13.*compile=False"):
            higher.compile_meta_step(mse, mse, steps=STEPS, tasks=tasks)
        return
    meta = higher.compile_meta_step(mse, mse, steps=STEPS, tasks=tasks, backend=BACKEND)
    assert_close(meta_gradient(meta, name, x, y), reference(name, x, y))
    # a second call with other weights runs the same graph and is exact too
    assert_close(meta_gradient(meta, name, x * 0.5, y), reference(name, x * 0.5, y))


def test_refusals_are_clear() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with pytest.raises(higher.FastPathError, match="steps must be a positive int"):
        higher.compile_meta_step(mse, mse, steps=0)
    with pytest.raises(higher.UsageError, match="callable"):
        higher.compile_meta_step(3, mse, steps=2)  # type: ignore[arg-type]
    loop = higher.compile_meta_step(mse, mse, steps=2, tasks=TASKS, compile=False)
    with pytest.raises(higher.FastPathError, match=r"task dimension first: shape \(3, \.\.\.\)"):
        loop(model, opt, x[0], y[0])
    with pytest.raises(higher.UsageError, match="torch.optim.Optimizer"):
        loop(model, "sgd", x, y)  # type: ignore[arg-type]
    bad = higher.compile_meta_step(lambda m, x, y: m(x) - y, mse, steps=2, compile=False)
    with pytest.raises(higher.FastPathError, match="scalar"):
        bad(model, opt, x[0], y[0])
    # batch statistics: vmap(grad) and torch.compile get their second-order gradient wrong
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(higher.FastPathError, match="BatchNorm1d.*batched_innerloop_ctx"):
        loop(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y)
    net.eval()  # running statistics: fine
    assert loop(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y).shape == (TASKS,)

    class Handmade(higher.optim.DifferentiableOptimizer):
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            pass

    class Plain(torch.optim.Adam):
        pass

    higher.register_optim(Plain, Handmade)
    with pytest.raises(higher.FastPathError, match="rule-based"):
        loop(model, Plain(model.parameters()), x, y)
    assert all(p.grad is None for p in model.parameters())
