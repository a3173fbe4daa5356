"""What a user of the plugin writes: `higher` finds the twin through the entry point, and the
estimators meta-train the weights."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import torch
from higher_learned_opt import (
    DifferentiableLearnedOptimizer,
    LearnedOptimizer,
    init_weights,
    pretrained_weights,
)

import higher
import higher.estimators as est


def task() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = [torch.randn(16, 3), torch.randn(16, 1)]
    return model.double(), [d.double() for d in data]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, y)


def test_the_entry_point_is_declared() -> None:
    (ep,) = [
        e for e in importlib.metadata.entry_points(group="higher.optimizers")
        if e.name == "higher_learned_opt.LearnedOptimizer"
    ]  # fmt: skip
    assert ep.value == "higher_learned_opt:DifferentiableLearnedOptimizer"
    assert ep.load() is DifferentiableLearnedOptimizer
    name = f"{LearnedOptimizer.__module__}.{LearnedOptimizer.__qualname__}"
    assert name == ep.name


def test_innerloop_ctx_finds_the_twin_and_steps_as_torch_does() -> None:
    model, (x, y) = task()
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters())
    plain = LearnedOptimizer(reference)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert type(diffopt) is DifferentiableLearnedOptimizer
        for _ in range(4):
            diffopt.step(mse(fmodel(x), y))
            plain.zero_grad()
            out = torch.func.functional_call(
                model, dict(zip([n for n, _ in model.named_parameters()], reference)), (x,)
            )
            mse(out, y).backward()
            plain.step()
        meta = mse(fmodel(x), y)
        meta.backward()
    for fast, ref in zip(fmodel.fast_params, reference):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert opt.state == {}  # the torch optimizer is untouched


def test_higher_finds_the_twin_with_no_registration() -> None:
    code = (
        "import sys, torch, higher.optim\n"
        "assert 'higher_learned_opt' not in sys.modules\n"
        "from higher_learned_opt import LearnedOptimizer\n"
        "w = torch.nn.Parameter(torch.ones(2))\n"
        "print(type(higher.optim.get_diff_optim(LearnedOptimizer([w]), [w])).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DifferentiableLearnedOptimizer"


def _problem(weights: torch.Tensor) -> tuple[est.InnerProblem, list[torch.Tensor]]:
    model, (x, y) = task()
    opt = LearnedOptimizer(model.parameters(), weights=weights)
    problem = est.InnerProblem(model, opt, lambda m, x, y: mse(m(x), y), hyper=("weights",))
    return problem, [x.expand(3, *x.shape), y.expand(3, *y.shape)]


def test_inner_problem_meta_trains_the_weights_with_truncated_backprop() -> None:
    weights = init_weights(hidden=4).double()
    problem, data = _problem(weights)
    (meta,) = problem.meta()
    torch.testing.assert_close(meta, weights, rtol=0, atol=0)
    estimate = est.TruncatedBackprop(problem.unroll, problem.init).step([meta], *data)
    # the same gradient by hand: three steps of innerloop_ctx with the weights as a tensor
    model, (x, y) = task()
    live = weights.clone().requires_grad_()
    opt = LearnedOptimizer(model.parameters(), weights=weights)
    with higher.innerloop_ctx(model, opt, override={"weights": [live]}) as (fmodel, diffopt):
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(3):
            loss = mse(fmodel(x), y)
            total = total + loss
            diffopt.step(loss)
    (want,) = torch.autograd.grad(total, [live])
    torch.testing.assert_close(estimate.loss, total.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(estimate.grads[0], want, rtol=1e-8, atol=1e-12)
    assert want.abs().max() > 1e-4


def test_inner_problem_runs_pes_over_the_weights() -> None:
    problem, data = _problem(pretrained_weights().double())
    meta = problem.meta()
    pes = est.PES(problem.unroll, problem.init, particles=8, sigma=0.01, seed=0)
    estimates = [pes.step(meta, *data) for _ in range(2)]
    for e in estimates:
        assert e.grads[0].shape == (194,) and e.particles == 8
        assert bool(torch.isfinite(e.grads[0]).all()) and e.grads[0].abs().sum() > 0
    assert estimates[1].loss < estimates[0].loss  # the second truncation starts further on
