"""Random hyperparameters (hypothesis): twins equal torch.optim wherever torch accepts them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import higher.optim

unit = st.floats(0.0, 0.99)
positive = st.floats(1e-4, 0.2)
HYPERS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "SGD": st.fixed_dictionaries(
        {"lr": positive, "momentum": unit, "dampening": unit, "weight_decay": positive}
    ),
    "Adam": st.fixed_dictionaries(
        {
            "lr": positive,
            "betas": st.tuples(unit, unit),
            "eps": positive,
            "weight_decay": positive,
            "amsgrad": st.booleans(),
        }
    ),
    "RMSprop": st.fixed_dictionaries(
        {
            "lr": st.floats(1e-4, 0.02),
            "alpha": st.floats(0.01, 0.99),  # alpha=0, centered: torch itself goes NaN
            "eps": positive,
            "momentum": unit,
            "centered": st.booleans(),
            "weight_decay": positive,
        }
    ),
    "NAdam": st.fixed_dictionaries(
        {
            "lr": positive,
            "betas": st.tuples(unit, unit),
            "momentum_decay": positive,
            "weight_decay": positive,
        }
    ),
    "Adagrad": st.fixed_dictionaries(
        {
            "lr": positive,
            "lr_decay": positive,
            "initial_accumulator_value": positive,
            "eps": positive,
        }
    ),
}


@pytest.mark.parametrize("name", sorted(HYPERS))
def test_random_hyperparameters_match_torch(name: str) -> None:
    @settings(max_examples=15, deadline=None, database=None)
    @given(options=HYPERS[name], seed=st.integers(0, 2**16))
    def check(options: dict[str, Any], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        start = [
            torch.randn(3, 2, generator=gen, dtype=torch.float64),
            torch.randn(4, generator=gen, dtype=torch.float64),
        ]
        params = [p.clone().requires_grad_() for p in start]
        opt = getattr(torch.optim, name)(params, **options)
        diffopt = higher.optim.get_diff_optim(opt, params)
        fast = [p.clone().requires_grad_() for p in start]

        def loss(ps: list[torch.Tensor], k: int) -> torch.Tensor:
            return (ps[0].sum(1) * ps[1][:3] - k).pow(2).sum() + ps[1].cos().sum()

        for k in range(6):
            opt.zero_grad()
            torch.autograd.backward(loss(params, k))
            opt.step()
            fast = diffopt.step(loss(fast, k), params=fast)
            for ours, theirs in zip(fast, params, strict=True):
                torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)

    check()
