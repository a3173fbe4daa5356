# mypy: disable-error-code="union-attr,index,arg-type,call-overload"
# (tests index Sequential models and read .grad, which torch types as Optional)
"""Compatibility with higher 0.2.1, written from its documented behaviour (docs and README).

Every public name and option of the 0.2.1 API, checked against independent references:
hand-unrolled updates with torch.func.functional_call, torch.optim, and finite differences.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import higher

DT = torch.float64


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, 1, generator=g, dtype=DT)


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _ref_loss(
    model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> Any:
    return F.mse_loss(functional_call(model, dict(zip(_names(model), params)), (x,)), y)


def _ref_sgd_unroll(
    model: nn.Module, p0: list[torch.Tensor], lr: Any, steps: int, x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    history = [p0]
    for _ in range(steps):
        loss = _ref_loss(model, history[-1], x, y)
        grads = torch.autograd.grad(loss, history[-1], create_graph=True)
        history.append([p - lr * g for p, g in zip(history[-1], grads)])
    return history


def test_top_level_names() -> None:
    for name in ["innerloop_ctx", "monkeypatch", "get_diff_optim", "create_diff_optim"]:
        assert callable(getattr(higher, name))
    assert higher.register_optim is higher.optim.register_optim
    assert higher.patch.monkeypatch is higher.monkeypatch
    assert callable(higher.utils.flatten)
    assert higher.__version__ == importlib.metadata.version("higher-core")


def test_maml_with_copy_initial_weights_false_fills_model_grads() -> None:
    model, (x, y), (xq, yq) = _net(), _data(1), _data(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()
    p0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    final = _ref_sgd_unroll(model, p0, 0.3, 3, x, y)[-1]
    expected = torch.autograd.grad(_ref_loss(model, final, xq, yq), p0)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-13)


def test_copy_initial_weights_true_leaves_model_grads_empty() -> None:
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        loss = F.mse_loss(fmodel(x), y)
        loss.backward()
        init = fmodel.init_fast_params
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in init)


def test_history_by_time_equals_the_unrolled_updates() -> None:
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(F.mse_loss(fmodel(x), y))
        p0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
        ref = _ref_sgd_unroll(model, p0, 0.2, 4, x, y)
        for t in range(5):
            for ours, theirs in zip(fmodel.parameters(time=t), ref[t]):
                torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_test_time_track_higher_grads_false_keeps_no_graph() -> None:
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
        assert all(p.grad_fn is None for p in fmodel.parameters())
        with pytest.raises(ValueError, match="only the current fast weights"):
            fmodel.parameters(time=1)
        p0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
        expected = _ref_sgd_unroll(model, p0, 0.2, 3, x, y)[-1]
        for ours, theirs in zip(fmodel.parameters(), expected):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-14)


def test_learnable_learning_rate_through_override_matches_finite_differences() -> None:
    model, (x, y), (xq, yq) = _net(), _data(1), _data(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def meta_loss(lr: torch.Tensor) -> torch.Tensor:
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(x), y))
            value: torch.Tensor = F.mse_loss(fmodel(xq), yq)
            return value

    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(meta_loss(lr), lr)
    eps = 1e-6
    base = lr.detach()
    numeric = (meta_loss(base + eps).detach() - meta_loss(base - eps).detach()) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-10)


def test_step_with_explicit_params_and_params_forward() -> None:
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fmodel = higher.monkeypatch(model)
    diffopt = higher.get_diff_optim(opt, model.parameters())  # no fmodel: params are explicit
    params = list(fmodel.parameters())
    for _ in range(2):
        params = diffopt.step(F.mse_loss(fmodel(x, params=params), y), params=params)
    p0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    expected = _ref_sgd_unroll(model, p0, 0.1, 2, x, y)[-1]
    for ours, theirs in zip(params, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    assert len(list(fmodel.parameters(time=2))) == 4  # forwards with params= kept the history


def test_grouped_parameters_follow_torch_optim() -> None:
    model, (x, y) = _net(), _data()
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.05, "momentum": 0.9},
        {"params": list(model[2].parameters()), "lr": 0.2},
    ]
    opt = torch.optim.SGD(groups, lr=0.1)
    twin, twin_opt = _net(), None
    twin_opt = torch.optim.SGD(
        [
            {"params": list(twin[0].parameters()), "lr": 0.05, "momentum": 0.9},
            {"params": list(twin[2].parameters()), "lr": 0.2},
        ],
        lr=0.1,
    )
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(F.mse_loss(fmodel(x), y))
            twin_opt.zero_grad()
            F.mse_loss(twin(x), y).backward()
            twin_opt.step()
        for ours, theirs in zip(fmodel.parameters(), twin.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_create_diff_optim_from_a_type() -> None:
    model, (x, y) = _net(), _data()
    fmodel = higher.monkeypatch(model)
    diffopt = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1}, fmodel=fmodel)
    diffopt.step(F.mse_loss(fmodel(x), y))
    p0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for ours, theirs in zip(fmodel.parameters(), _ref_sgd_unroll(model, p0, 0.1, 1, x, y)[-1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


class SignSGD(torch.optim.Optimizer):
    """A torch optimizer of the user's own: p <- p - lr * tanh(g / temperature)."""

    def __init__(self, params: Any, lr: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__(params, {"lr": lr, "temperature": temperature})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * torch.tanh(p.grad / group["temperature"]))


class DifferentiableSignSGD(higher.optim.DifferentiableOptimizer):
    """The 0.2.1 README recipe, exactly as written there."""

    def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
        zipped = zip(self.param_groups, grouped_grads)
        for group_idx, (group, grads) in enumerate(zipped):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                self.state[group_idx][p_idx]["seen"] = True
                new_p = p - group["lr"] * torch.tanh(g / group["temperature"])
                group["params"][p_idx] = new_p


def test_custom_optimizer_per_the_readme_recipe() -> None:
    higher.register_optim(SignSGD, DifferentiableSignSGD)
    model, (x, y) = _net(), _data()
    twin = _net()
    opt, twin_opt = SignSGD(model.parameters(), lr=0.05, temperature=0.5), None
    twin_opt = SignSGD(twin.parameters(), lr=0.05, temperature=0.5)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableSignSGD)
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
            twin_opt.zero_grad()
            F.mse_loss(twin(x), y).backward()
            twin_opt.step()
        assert diffopt.state[0][0]["seen"] is True
        for ours, theirs in zip(fmodel.parameters(), twin.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_rnn_model_meta_gradient() -> None:
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 5, batch_first=True)
            self.out = nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(x)
            value: torch.Tensor = self.out(h[:, -1])
            return value

    model = Tagger().to(DT)
    x, y = torch.randn(4, 6, 3, dtype=DT), torch.randn(4, 1, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(x), y).backward()
    p0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    final = _ref_sgd_unroll(model, p0, 0.5, 2, x, y)[-1]
    expected = torch.autograd.grad(_ref_loss(model, final, x, y), p0)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-13)


def test_model_and_optimizer_are_not_mutated() -> None:
    model, (x, y) = _net(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    F.mse_loss(model(x), y).backward()
    opt.step()
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
    for p, b in zip(model.parameters(), before_params):
        assert torch.equal(p, b)
    for k, v in opt.state[next(iter(model.parameters()))].items():
        assert torch.equal(v, before_state[k]), k


def test_bad_arguments_are_clear_errors() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"),
        higher.innerloop_ctx("m", opt),
    ):
        pass
    with (
        pytest.raises(TypeError, match=r"opt must be a torch\.optim\.Optimizer, got dict"),
        higher.innerloop_ctx(model, {}),
    ):
        pass
    other = torch.optim.SGD(_net().parameters(), lr=0.1)
    with (
        pytest.raises(ValueError, match="not among reference_params"),
        higher.innerloop_ctx(model, other),
    ):
        pass
    with pytest.raises(ValueError):
        higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1})  # neither params nor fmodel
    assert issubclass(higher.UsageError, higher.HigherError)
