# mypy: disable-error-code="union-attr,index,arg-type"
# (tests index Sequential models and read .grad, which torch types as Optional)
"""First-order MAML: with `track_higher_grads=False` the query loss still reaches the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import higher

DT = torch.float64


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    x, y, xq, yq = (torch.randn(10, d, dtype=DT) for d in (3, 1, 3, 1))
    return model, x, y, xq, yq


def test_fomaml_puts_the_adapted_weights_gradient_on_the_model() -> None:
    model, x, y, xq, yq = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False) as (
        fmodel,
        diffopt,
    ):
        for _ in range(4):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()
        adapted = [p.detach().clone().requires_grad_() for p in fmodel.fast_params]
        fast_grads = [p.grad for p in fmodel.fast_params]
    # Reference: the same adaptation by torch.optim, then d(query loss)/d(adapted weights).
    twin = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.5)
    for _ in range(4):
        twin_opt.zero_grad()
        F.mse_loss(twin(x), y).backward()
        twin_opt.step()
    for a, t in zip(adapted, twin.parameters()):
        torch.testing.assert_close(a, t.detach(), rtol=1e-12, atol=1e-14)
    twin.zero_grad()
    F.mse_loss(twin(xq), yq).backward()
    for p, t, g in zip(model.parameters(), twin.parameters(), fast_grads):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, t.grad, rtol=1e-12, atol=1e-14)  # 0.2.1 code reads these


def test_fomaml_keeps_no_inner_graph_and_frozen_weights_stay_frozen() -> None:
    model, x, y, xq, yq = _setup()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False) as (
        fmodel,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
        frozen = fmodel.fast_params[1]
        assert frozen.requires_grad is False
        assert torch.equal(frozen, model[0].bias)
        # One node between each adapted weight and the model's: no unrolled graph is held.
        weight = fmodel.fast_params[0]
        assert weight.grad_fn is not None
        assert {type(n[0]).__name__ for n in weight.grad_fn.next_functions if n[0]} <= {
            "SubBackward0",
            "AccumulateGrad",
        }
        F.mse_loss(fmodel(xq), yq).backward()
    assert model[0].bias.grad is None
    assert model[0].weight.grad is not None


def _meta_gradient(lr: float, track: bool) -> torch.Tensor:
    model, x, y, xq, yq = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=track) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_first_order_differs_from_second_order_by_a_term_of_order_lr() -> None:
    gaps = [
        (_meta_gradient(lr, True) - _meta_gradient(lr, False)).abs().max().item()
        for lr in (1e-2, 1e-4)
    ]
    assert gaps[0] > 1e-4  # the second-order term is really there...
    assert 50 < gaps[0] / gaps[1] < 200  # ...and shrinks linearly with the learning rate
