"""What a user of the plugin writes: `higher.innerloop_ctx(model, Lion(...))`, and it works."""

from __future__ import annotations

import pytest
import torch
from higher_lion import LION, DifferentiableLion, Lion, LionState
from torch.func import functional_call
from torch.torch_version import TorchVersion

import higher
from higher.contrib import check_hypergradient


def task() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = [torch.randn(16, 3), torch.randn(16, 1), torch.randn(16, 3), torch.randn(16, 1)]
    return model.double(), [d.double() for d in data]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, y)


def test_maml_with_lion_just_works() -> None:
    model, (x, y, x_val, y_val) = task()
    opt = Lion(model.parameters(), lr=0.01, weight_decay=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableLion)
        for _ in range(4):
            diffopt.step(loss_fn(fmodel(x), y))
        meta_loss = loss_fn(fmodel(x_val), y_val)
        meta_loss.backward()
    got = [p.grad for p in model.parameters()]

    # The same unroll written by hand with the plugin's pure step and torch.func.
    names = [n for n, _ in model.named_parameters()]
    init = [p.detach().clone().requires_grad_() for p in model.parameters()]
    params, moments = list(init), [torch.zeros_like(p) for p in init]
    for _ in range(4):
        loss = loss_fn(functional_call(model, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hyper = {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.1}
        for i, (p, g, m) in enumerate(zip(params, grads, moments)):  # the pure rule, per tensor
            (params[i],), state = LION.update([p], [g], LionState([m]), hyper)
            moments[i] = state.exp_avg[0]
    want_loss = loss_fn(functional_call(model, dict(zip(names, params)), (x_val,)), y_val)
    want = torch.autograd.grad(want_loss, init)
    torch.testing.assert_close(meta_loss, want_loss, rtol=1e-12, atol=0)
    for mine, w in zip(got, want):
        assert mine is not None
        torch.testing.assert_close(mine, w, rtol=1e-10, atol=1e-12)
    # sign() has no slope: the meta-gradient is the weight decay's (1 - lr * wd)^4 plus what
    # flows through the meta-loss; it is not zero, and the inner steps did move the weights.
    assert all(g.abs().sum() > 0 for g in want)
    assert opt.state == {}  # the torch optimizer is untouched


def test_a_learnable_learning_rate() -> None:
    model, (x, y, x_val, y_val) = task()

    def meta_loss(lr: torch.Tensor) -> torch.Tensor:
        opt = Lion(model.parameters(), lr=0.5)  # overridden by the tensor
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(loss_fn(fmodel(x), y))
            return loss_fn(fmodel(x_val), y_val)

    report = check_hypergradient(meta_loss, {"lr": torch.tensor(0.01)}, rtol=1e-6)
    (entry,) = report.entries
    assert entry.where == "lr"
    assert abs(entry.autograd) > 1e-3  # a real slope, matched by finite differences


def test_as_the_issue_puts_it() -> None:
    model, (x, y, _, _) = task()
    with higher.innerloop_ctx(model, Lion(model.parameters())) as (fmodel, diffopt):
        diffopt.step(loss_fn(fmodel(x), y))
        moved = [new - old for new, old in zip(fmodel.fast_params, model.parameters())]
    # one Lion step: every coordinate moves by exactly the default lr, 1e-4, against its gradient
    grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    for step, grad in zip(moved, grads):
        torch.testing.assert_close(step, -1e-4 * grad.sign(), rtol=1e-9, atol=1e-15)


def test_the_rule_twin_runs_under_compile_step() -> None:
    """A twin written as a Rule compiles: the same steps and meta-gradient as diffopt.step."""
    model, (x, y, x_val, y_val) = task()
    if (
        TorchVersion(torch.__version__) < "2.3"
    ):  # torch.compile of torch.func.grad: refused, clearly
        with pytest.raises(higher.UsageError, match=r"needs torch >= 2\.3"):
            higher.compile_step(lambda m, x, y: loss_fn(m(x), y))
        return
    step = higher.compile_step(lambda m, x, y: loss_fn(m(x), y), backend="aot_eager")
    results = []
    for compiled in (True, False):
        opt = Lion(model.parameters(), lr=0.01, weight_decay=0.1)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                if compiled:
                    step(fmodel, diffopt, x, y)
                else:
                    diffopt.step(loss_fn(fmodel(x), y))
            meta = loss_fn(fmodel(x_val), y_val)
            results.append(torch.autograd.grad(meta, list(model.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
