"""`higher.batched_innerloop_ctx`: T tasks at once (the forward vmapped, or looped over tasks)
equal T separate inner loops, task for task (float64: meta-gradients w.r.t. the initial weights
and a learnable learning rate, running statistics, per-task gradient clipping, first order), and
refuses what it cannot run."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher

TASKS = 3
BATCHINGS = ("vmap", "loop")
Make = Callable[[Any], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Make] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.05),  # a rule with shared scalar state
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    ).double()  # fmt: skip


def regression(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TASKS, 5, 2, generator=g, dtype=torch.float64)
    return x, torch.randn(TASKS, 5, 1, generator=g, dtype=torch.float64)


def per_task_loop(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    loss: Callable[..., torch.Tensor], steps: int, **kwargs: Any,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:  # fmt: skip
    """The reference: one innerloop_ctx per task; the summed meta-loss and each task's buffers."""
    total = torch.zeros((), dtype=torch.float64)
    buffers = []
    callback = kwargs.pop("grad_callback", None)
    for t in range(TASKS):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs) as (f, d):
            for _ in range(steps):
                d.step(loss(f(x[t]), y[t]), grad_callback=callback)
            total = total + loss(f(x[t]), y[t])
            buffers.append(dict(f.named_buffers()))
    return total, buffers


def batched_loop(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    loss: Callable[..., torch.Tensor], steps: int, **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    callback = kwargs.pop("grad_callback", None)
    with higher.batched_innerloop_ctx(
        model, opt, tasks=TASKS, copy_initial_weights=False, **kwargs
    ) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(torch.vmap(loss)(fmodel(x), y), grad_callback=callback)
        return torch.vmap(loss)(fmodel(x), y).sum(), fmodel.named_buffers()


def assert_close(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_meta_gradient_and_hypergradient_equal_the_per_task_loop(name: str, batching: str) -> None:
    x, y = regression()
    grads = []
    for run in (per_task_loop, batched_loop):
        model = mlp()
        lr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        extra = {"batching": batching} if run is batched_loop else {}
        meta, _ = run(model, OPTIMIZERS[name](model.parameters()), x, y, F.mse_loss, 3,
                      override={"lr": [lr]}, **extra)  # fmt: skip
        grads.append(torch.autograd.grad(meta, [*model.parameters(), lr]))
    assert_close(grads[0], grads[1])
    assert grads[0][-1].abs() > 0


@pytest.mark.parametrize("batching", BATCHINGS)
def test_batchnorm_in_training_mode_and_per_task_clipping_are_exact(batching: str) -> None:
    """Batch statistics per task, running statistics per task, clip_grad_norm per task."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(TASKS, 6, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (TASKS, 6), generator=g)
    clip = higher.optim.clip_grad_norm(0.5)
    model = convnet()
    meta, per_task = per_task_loop(model, torch.optim.SGD(model.parameters(), lr=0.2), x, y,
                                   F.cross_entropy, 2, grad_callback=clip)  # fmt: skip
    want = torch.autograd.grad(meta, list(model.parameters()))
    model = convnet()
    meta, stacked = batched_loop(model, torch.optim.SGD(model.parameters(), lr=0.2), x, y,
                                 F.cross_entropy, 2, grad_callback=clip,
                                 batching=batching)  # fmt: skip
    assert_close(torch.autograd.grad(meta, list(model.parameters())), want)
    for name, value in stacked.items():
        expected = torch.stack([task[name] for task in per_task])
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
    assert not torch.equal(stacked["1.running_mean"][0], stacked["1.running_mean"][1])


def test_first_order_and_per_task_initial_weights() -> None:
    x, y = regression(3)
    # first order (track_higher_grads=False): gradients reach model.parameters() as is
    firsts = []
    for run in (per_task_loop, batched_loop):
        model = mlp()
        meta, _ = run(model, OPTIMIZERS["adam"](model.parameters()), x, y, F.mse_loss, 2,
                      track_higher_grads=False)  # fmt: skip
        meta.backward()
        firsts.append([p.grad for p in model.parameters()])
    assert_close(firsts[0], firsts[1])  # type: ignore[arg-type]
    # copy_initial_weights=True: each task's gradient w.r.t. its own initial weights
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.batched_innerloop_ctx(model, opt, tasks=TASKS) as (fmodel, diffopt):
        diffopt.step(torch.vmap(F.mse_loss)(fmodel(x), y))
        got = torch.autograd.grad(
            torch.vmap(F.mse_loss)(fmodel(x), y).sum(), list(fmodel.parameters(time=0))
        )
        assert len(list(fmodel.parameters(time=1))) == 4
    for t in range(TASKS):
        with higher.innerloop_ctx(model, opt) as (f, d):
            d.step(F.mse_loss(f(x[t]), y[t]))
            want = torch.autograd.grad(F.mse_loss(f(x[t]), y[t]), list(f.parameters(time=0)))
        assert_close([g[t] for g in got], list(want))
    assert all(p.grad is None for p in model.parameters())  # the model is not touched


def test_refusals_are_clear() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = regression()
    with (
        pytest.raises(higher.FastPathError, match="positive int"),
        higher.batched_innerloop_ctx(model, opt, tasks=0),
    ):
        pass
    with (
        pytest.raises(higher.UsageError, match=r"torch\.nn\.Module"),
        higher.batched_innerloop_ctx("net", opt, tasks=2),  # type: ignore[arg-type]
    ):
        pass
    with higher.batched_innerloop_ctx(model, opt, tasks=TASKS) as (fmodel, diffopt):
        with pytest.raises(higher.FastPathError, match=r"expected \(3,\): one loss per task"):
            diffopt.step(F.mse_loss(fmodel(x), y))
        with pytest.raises(higher.FastPathError, match=r"one input per task, shape \(3, \.\.\.\)"):
            fmodel(x[0])
        with pytest.raises(higher.FastPathError, match=r"expected shape \(3, 6, 2\)"):
            fmodel.update_params([p[0] for p in fmodel.fast_params])
        with pytest.raises(higher.FastPathError, match="time=5"):
            fmodel.parameters(time=5)
        with pytest.raises(higher.FastPathError, match="depends on none of the current"):
            diffopt.step(torch.zeros(TASKS, requires_grad=True) * 1.0)
        assert len(list(fmodel.parameters(time=0))) == 4  # nothing was committed

    class Handmade(higher.optim.DifferentiableOptimizer):
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            pass

    class Plain(torch.optim.SGD):
        pass

    higher.register_optim(Plain, Handmade)
    with (
        pytest.raises(higher.FastPathError, match="rule-based"),
        higher.batched_innerloop_ctx(model, Plain(model.parameters(), lr=0.1), tasks=2),
    ):
        pass


def test_auto_batching_loops_over_tasks_for_convolutions_on_a_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """vmap's batched convolutions lose to a loop on a CPU; small MLPs gain from vmap. Either
    way the choice is logged, and an explicit batching= is taken as given."""
    caplog.set_level(logging.DEBUG, logger="higher")
    for make, want in ((convnet, "loop"), (mlp, "vmap")):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        caplog.clear()
        with higher.innerloop_ctx(model, opt, tasks=TASKS) as (fmodel, _):
            assert fmodel.batching == want
        assert [r.name for r in caplog.records] == ["higher"]
        assert ("Conv2d layers on a CPU" in caplog.text) == (want == "loop")
        other = "vmap" if want == "loop" else "loop"
        with higher.innerloop_ctx(model, opt, tasks=TASKS, batching=other) as (fmodel, _):
            assert fmodel.batching == other
    # randomness="error" is vmap's check: auto keeps vmap, an explicit loop is refused
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, tasks=TASKS, randomness="error") as (fmodel, _):
        assert fmodel.batching == "vmap"
    with (
        pytest.raises(higher.FastPathError, match="randomness='error' is vmap's check"),
        higher.innerloop_ctx(model, opt, tasks=TASKS, randomness="error", batching="loop"),
    ):
        pass
    with (
        pytest.raises(higher.FastPathError, match=r"batching must be one of 'auto', 'vmap'"),
        higher.innerloop_ctx(model, opt, tasks=TASKS, batching="scan"),
    ):
        pass
    with (
        pytest.raises(higher.UsageError, match=r"batching='loop' says how tasks run"),
        higher.innerloop_ctx(model, opt, batching="loop"),
    ):
        pass


@pytest.mark.parametrize("batching", BATCHINGS)
def test_dropout_draws_per_task_or_the_same_for_every_task(batching: str) -> None:
    model = nn.Sequential(nn.Linear(2, 50), nn.Dropout(0.5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(TASKS, 4, 2, dtype=torch.float64)  # every task the same input
    for randomness in ("different", "same"):
        with higher.batched_innerloop_ctx(
            model, opt, tasks=TASKS, randomness=randomness, batching=batching
        ) as (fmodel, _):
            out = fmodel(x)
        dropped = [set((row == 0).nonzero().flatten().tolist()) for row in out[:, 0]]
        assert all(0 < len(d) < 50 for d in dropped)
        assert (dropped[0] == dropped[1] == dropped[2]) == (randomness == "same")


@pytest.mark.parametrize("batching", BATCHINGS)
def test_outputs_of_every_structure_are_stacked_per_task(batching: str) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 3).double()

        def forward(self, x: torch.Tensor, scale: float, shift: torch.Tensor) -> Any:
            h = self.lin(x) * scale + shift
            return {"h": h, "pair": (h.sum(), h.mean(-1))}

    model = Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, _ = regression()
    shift = torch.ones(3, dtype=torch.float64)  # a keyword tensor: shared by every task
    with higher.batched_innerloop_ctx(model, opt, tasks=TASKS, batching=batching) as (fmodel, _):
        out = fmodel(x, 2.0, shift=shift)
    assert out["h"].shape == (TASKS, 5, 3) and out["pair"][1].shape == (TASKS, 5)
    for t in range(TASKS):
        want = model.lin(x[t]) * 2.0 + shift
        torch.testing.assert_close(out["h"][t], want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out["pair"][0][t], want.sum(), rtol=1e-12, atol=1e-14)


def test_a_loop_refuses_tasks_whose_outputs_differ_in_structure() -> None:
    class Branchy(nn.Linear):
        def forward(self, x: torch.Tensor) -> Any:
            y = super().forward(x)
            return (y, "positive") if x.sum() > 0 else (y, "negative")

    model = Branchy(2, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.stack([torch.ones(4, 2), -torch.ones(4, 2)]).double()
    with higher.batched_innerloop_ctx(model, opt, tasks=2, batching="loop") as (fmodel, _):
        with pytest.raises(higher.FastPathError, match="task 1's output differs in structure"):
            fmodel(x)
        y, sign = fmodel(x.abs())
        assert sign == "positive" and y.shape == (2, 4, 1)


def nested(*sizes: int) -> torch.Tensor:
    """Tasks of unequal sizes, as a nested tensor (torch warns it is a prototype)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.ones(n, 2, dtype=torch.float64) for n in sizes])


def test_tasks_of_unequal_sizes_are_refused_with_what_to_do() -> None:
    """A nested tensor ended in torch's "NestedTensorImpl doesn't support sizes"."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.batched_innerloop_ctx(model, opt, tasks=TASKS) as (fmodel, _):
        with pytest.raises(
            higher.FastPathError, match=r"argument 0 is a nested tensor.*Pad the tasks.*mask"
        ):
            fmodel(nested(3, 4, 5))
        with pytest.raises(higher.FastPathError, match=r"keyword argument 'z' is a nested"):
            fmodel(torch.ones(TASKS, 2, 2, dtype=torch.float64), z=nested(1, 2))
    meta = higher.compile_meta_step(
        lambda m, x: m(x).pow(2).mean(), lambda m, x: m(x).mean(), steps=1, tasks=TASKS,
        compile=False,
    )  # fmt: skip
    with pytest.raises(higher.FastPathError, match=r"nested tensor.*innerloop_ctx once per task"):
        meta(model, opt, nested(3, 4, 5))


@pytest.mark.parametrize("batching", BATCHINGS)
def test_a_loss_that_couples_the_tasks_is_refused(batching: str) -> None:
    """`l - l.mean()` cancels every task's gradient exactly: the step moved nothing, silently."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = regression()
    mse = torch.vmap(F.mse_loss)
    for track in (True, False):
        with higher.batched_innerloop_ctx(
            model, opt, tasks=TASKS, track_higher_grads=track, batching=batching
        ) as (fmodel, diffopt):
            before = fmodel.fast_params
            losses = mse(fmodel(x), y)
            with pytest.raises(higher.FastPathError, match=r"couple the tasks.*l - l\.mean\(\)"):
                diffopt.step(losses - losses.mean())
            assert all(a is b for a, b in zip(fmodel.fast_params, before))  # nothing committed
            diffopt.step(losses)  # the graph is kept: the step on the right loss runs
            assert not torch.equal(fmodel.fast_params[0], before[0])


def test_zero_gradients_of_uncoupled_losses_are_not_refused() -> None:
    """Dead units: nonzero losses, every gradient exactly zero, and no task reads another's
    weights: a step (of zero) is taken, as per-task loops take it."""
    first, last = nn.Linear(2, 3).double(), nn.Linear(3, 1).double()
    with torch.no_grad():
        first.weight.zero_()
        first.bias.fill_(-1.0)  # every ReLU dead: no gradient reaches any weight
    last.bias.requires_grad_(False)
    model = nn.Sequential(first, nn.ReLU(), last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = regression()
    with higher.batched_innerloop_ctx(model, opt, tasks=TASKS) as (fmodel, diffopt):
        losses = torch.vmap(F.mse_loss)(fmodel(x), y)
        assert bool((losses > 0).all())
        new = diffopt.step(losses)
    assert all(torch.equal(a, b) for a, b in zip(new, fmodel.parameters(time=0)))


@pytest.mark.cuda
@pytest.mark.parametrize("batching", BATCHINGS)
def test_on_cuda_equals_the_per_task_loop(batching: str) -> None:
    x, y = (t.cuda() for t in regression())
    grads = []
    for run in (per_task_loop, batched_loop):
        model = mlp().cuda()
        extra = {"batching": batching} if run is batched_loop else {}
        meta, _ = run(model, OPTIMIZERS["adam"](model.parameters()), x, y, F.mse_loss, 3, **extra)
        grads.append(torch.autograd.grad(meta, list(model.parameters())))
    assert_close(grads[0], grads[1])
