"""Hypergradients equal float64 central finite differences, for every twin and hyperparameter;
no NaN/inf in any order of gradient where a gradient entry is exactly zero."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import higher.optim
from higher.contrib import check_hypergradient

STEPS = 7  # RAdam rectifies from step 6 on
# name -> option sets (the second turns the optimizer's flags on)
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "SGD": [
        {"lr": 0.1, "momentum": 0.5, "dampening": 0.2, "weight_decay": 0.1},
        {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.1, "nesterov": True, "maximize": True},
    ],
    "Adam": [
        {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1},
        {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1, "amsgrad": True},
    ],
    "AdamW": [{"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}],
    "Adagrad": [
        {
            "lr": 0.1,
            "lr_decay": 0.1,
            "weight_decay": 0.1,
            "eps": 1e-3,
            "initial_accumulator_value": 0.2,
        },
    ],
    "Adadelta": [{"lr": 1.0, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.1}],
    "Adamax": [{"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}],
    "ASGD": [{"lr": 0.05, "lambd": 0.1, "alpha": 0.5, "t0": 1.5, "weight_decay": 0.1}],
    "RMSprop": [
        {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.1, "momentum": 0.5},
        {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "momentum": 0.5, "centered": True},
    ],
    "Rprop": [{"lr": 0.05, "etas": (0.4, 1.3), "step_sizes": (1e-3, 0.07)}],
    "NAdam": [
        {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1, "momentum_decay": 0.05}
    ],
    "RAdam": [{"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}],
    "Adafactor": [
        {"lr": 0.05, "beta2_decay": -0.5, "d": 1.5, "weight_decay": 0.1, "eps": (0.3, 2.0)}
    ],
}


def central_difference(f: Callable[[float], float], x: float, eps: float = 1e-5) -> float:
    """d f / d x by float64 central differences."""
    return (f(x + eps) - f(x - eps)) / (2 * eps)


pytestmark = pytest.mark.usefixtures("float64_default")


def initial_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_(),
        torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_(),
    ]


def inner_loss(params: list[torch.Tensor], k: int) -> torch.Tensor:
    a, b = params
    x = torch.tensor([0.7, -0.4], dtype=torch.float64) + 0.2 * k
    return ((a @ x).tanh() ** 2).sum() + ((b - 0.3 * k) ** 2).sum() + (a.sum() * b[0]).sin()


def meta_loss(params: list[torch.Tensor]) -> torch.Tensor:
    a, b = params
    return ((a - 0.3) ** 2).sum() + b.sin().sum()


def unroll(
    name: str,
    options: dict[str, Any],
    override: dict[str, list[Any]] | None,
    track: bool,
    start: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    params = initial_params() if start is None else start
    opt = getattr(torch.optim, name)(initial_params(), **options)
    diffopt = higher.optim.get_diff_optim(
        opt, opt.param_groups[0]["params"], override=override, track_higher_grads=track
    )
    for k in range(STEPS):
        params = diffopt.step(inner_loss(params, k), params=params)
    return meta_loss(params)


def hyper_cases() -> list[Any]:
    cases = []
    for name, option_sets in OPTIONS.items():
        if not hasattr(torch.optim, name):
            continue
        for n, options in enumerate(option_sets):
            for key, value in options.items():
                if isinstance(value, bool):
                    continue
                slots = [0, 1] if isinstance(value, tuple) else [None]
                for slot in slots:
                    label = key if slot is None else f"{key}[{slot}]"
                    cases.append(pytest.param(name, options, key, slot, id=f"{name}{n}-{label}"))
    return cases


def with_value(options: dict[str, Any], key: str, slot: int | None, value: Any) -> list[Any]:
    if slot is None:
        return [value]
    pair = list(options[key])
    pair[slot] = value
    return [tuple(pair)]


@pytest.mark.parametrize(("name", "options", "key", "slot"), hyper_cases())
def test_hypergradient_equals_finite_differences(
    name: str, options: dict[str, Any], key: str, slot: int | None
) -> None:
    base = float(options[key] if slot is None else options[key][slot])
    h = torch.tensor(base, dtype=torch.float64, requires_grad=True)
    meta = unroll(name, options, {key: with_value(options, key, slot, h)}, track=True)
    (grad,) = torch.autograd.grad(meta, h, allow_unused=True)
    analytic = 0.0 if grad is None else grad.item()

    def f(x: float) -> float:
        value = torch.tensor(x, dtype=torch.float64)
        return unroll(name, options, {key: with_value(options, key, slot, value)}, False).item()

    numeric = central_difference(f, base)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-7)
    if key in ("lr", "betas", "eps", "momentum"):  # these always move the trajectory
        assert abs(numeric) > 1e-6


@pytest.mark.parametrize("name", [n for n in OPTIONS if hasattr(torch.optim, n)])
def test_gradient_wrt_initial_params_equals_finite_differences(name: str) -> None:
    # Every entry of both initial tensors, by the project's public checker.
    options = OPTIONS[name][-1]
    check_hypergradient(
        lambda a, b: unroll(name, options, None, track=True, start=[a, b]),
        {"a": initial_params()[0].detach(), "b": initial_params()[1].detach()},
        eps=1e-6,
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Rprop", "Adagrad"])
def test_per_parameter_learning_rates(name: str) -> None:
    """Meta-SGD: one learnable learning rate per parameter entry, each checked."""
    options = OPTIONS[name][0]
    gen = torch.Generator().manual_seed(3)
    base = [
        options["lr"] * (1 + 0.5 * torch.rand(p.shape, generator=gen, dtype=torch.float64))
        for p in initial_params()
    ]
    report = check_hypergradient(
        lambda lr0, lr1: unroll(name, options, {"lr": [[lr0, lr1]]}, track=True),
        {"lr0": base[0], "lr1": base[1]},
        eps=1e-6,
        rtol=1e-5,
        atol=1e-8,
    )
    assert max(abs(e.finite_difference) for e in report.entries) > 1e-6  # the rates matter


ZERO_SAFE = [
    ("Adam", {"lr": 0.05}),
    ("Adam", {"lr": 0.05, "amsgrad": True}),
    ("AdamW", {"lr": 0.05}),
    ("NAdam", {"lr": 0.05}),
    ("RAdam", {"lr": 0.05}),
    ("Adamax", {"lr": 0.05}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
    ("Adagrad", {"lr": 0.1}),
    ("Adadelta", {"lr": 1.0}),
]


def relu_loss(params: list[torch.Tensor], k: int) -> torch.Tensor:
    # entries 0 and 1 are dead from the start; entry 2 is dead at even steps only
    (w,) = params
    x = torch.tensor([-1.0, -2.0, 1.0 if k % 2 else -1.0, 0.5], dtype=torch.float64)
    return torch.relu(w * x).pow(2).sum() + w[3] ** 2


@pytest.mark.parametrize(("name", "options"), ZERO_SAFE, ids=[f"{n}-{o}" for n, o in ZERO_SAFE])
def test_zero_gradients_give_finite_higher_order_gradients(
    name: str, options: dict[str, Any]
) -> None:
    w0 = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    torch_w = w0.clone().requires_grad_()
    opt = getattr(torch.optim, name)([torch_w], **options)
    lr = torch.tensor(options["lr"], dtype=torch.float64, requires_grad=True)
    start = w0.clone().requires_grad_()
    diffopt = higher.optim.get_diff_optim(opt, [torch_w], override={"lr": [lr]})
    params = [start]
    for k in range(5):
        opt.zero_grad()
        torch.autograd.backward(relu_loss([torch_w], k))
        opt.step()
        params = diffopt.step(relu_loss(params, k), params=params)
        torch.testing.assert_close(params[0], torch_w.detach(), rtol=1e-10, atol=1e-12)
    meta = (params[0] ** 2).sum()
    first = torch.autograd.grad(meta, [start, lr], create_graph=True)
    second = torch.autograd.grad(first[0].sum() + first[1], [start, lr], create_graph=True)
    third = torch.autograd.grad(second[0].sum() + second[1], [start, lr], allow_unused=True)
    for order in (first, second, third):
        for g in order:
            assert g is None or torch.isfinite(g).all()
    assert first[1].abs() > 0
