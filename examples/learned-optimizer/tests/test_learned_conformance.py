"""The conformance kit of `higher-contrib`, run on the plugin; and the hypergradient by the
MLP's weights against finite differences (the kit checks numbers and pairs only)."""

from __future__ import annotations

import torch
from higher_learned_opt import (
    DifferentiableLearnedOptimizer,
    LearnedOptimizer,
    init_weights,
    pretrained_weights,
)

import higher
from higher.contrib import ConformanceCase, check_hypergradient, parametrize_conformance

# `weights` is left at the pretrained default (a tensor: the kit's grid takes numbers). The
# weights were trained at lr=1e-3; up to 10x that, the kit's 10-step problem stays smooth.
GRID = {"lr": [1e-4, 1e-3, 1e-2], "maximize": [False, True]}


@parametrize_conformance(
    LearnedOptimizer, DifferentiableLearnedOptimizer, GRID, hyperparameters=["lr"]
)
def test_learned_optimizer_conforms(conformance_case: ConformanceCase) -> None:
    conformance_case.run()


# Far above it (50x, 500x) the unroll turns chaotic and finite differences of the meta-loss stop
# meaning anything; the steps must still be torch's, and finite at zero gradients.
@parametrize_conformance(
    LearnedOptimizer, DifferentiableLearnedOptimizer, {"lr": [0.05, 0.5]},
    checks=["steps", "zero_grad"],
)  # fmt: skip
def test_learned_optimizer_steps_conform_at_large_lr(conformance_case: ConformanceCase) -> None:
    conformance_case.run()


def _meta_loss(weights: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Five steps of the twin on a small regression, from weights and lr given as tensors."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(16, 1, dtype=torch.float64, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.double()
    opt = LearnedOptimizer(model.parameters())
    override = {"weights": [weights], "lr": [lr]}
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        return torch.nn.functional.mse_loss(fmodel(x), y)


def test_the_hypergradient_by_the_weights_matches_finite_differences() -> None:
    # the pretrained weights (194 values) along 6 random directions, and lr
    report = check_hypergradient(
        _meta_loss, {"weights": pretrained_weights().double(),
                     "lr": torch.tensor(0.01, dtype=torch.float64)},
        rtol=1e-5, atol=1e-9, directions=6,
    )  # fmt: skip
    slopes = [abs(e.autograd) for e in report.entries if e.where.startswith("weights")]
    assert len(slopes) == 6 and min(slopes) > 1e-5  # real slopes, matched
    # a small MLP (2 hidden units: 26 weights), entry by entry
    weights = init_weights(hidden=2, seed=1).double()
    weights[-6:-2] = torch.tensor([0.3, -0.2, 0.1, 0.4])  # an output layer that matters
    report = check_hypergradient(
        _meta_loss, {"weights": weights, "lr": torch.tensor(0.01, dtype=torch.float64)},
        rtol=1e-5, atol=1e-9, max_entries=26,
    )  # fmt: skip
    entries = [e for e in report.entries if e.where.startswith("weights")]
    assert len(entries) == 26
    assert sum(abs(e.autograd) > 1e-6 for e in entries) >= 22


def test_the_untrained_rule_has_a_hypergradient_too() -> None:
    weights = init_weights(hidden=3, seed=1).double().requires_grad_()
    lr = torch.tensor(0.01, dtype=torch.float64)
    (grad,) = torch.autograd.grad(_meta_loss(weights, lr), [weights])
    assert grad.shape == (weights.numel(),)
    assert bool(torch.isfinite(grad).all()) and grad.abs().max() > 1e-3
