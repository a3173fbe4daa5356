"""Lion itself, its twin's options, and how `higher` finds the twin."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from typing import Any

import pytest
import torch
from higher_lion import LION, DifferentiableLion, Lion

import higher.optim


def one_step(**options: Any) -> tuple[list[float], list[float]]:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = Lion([w], **options)
    w.grad = torch.tensor([0.5, 0.0, -4.0], dtype=torch.float64)
    opt.step()
    return w.tolist(), opt.state[w]["exp_avg"].tolist()


def test_one_step_by_hand() -> None:
    # c = (1 - 0.9) * g: signs (+, 0, -); p <- p (1 - 0.1 * 0.5) - 0.1 sign(c); m <- 0.01 g
    params, momentum = one_step(lr=0.1, weight_decay=0.5)
    assert params == pytest.approx([0.95 - 0.1, -1.9, 2.85 + 0.1], abs=1e-15)
    assert momentum == pytest.approx([0.005, 0.0, -0.04], abs=1e-15)
    params, _ = one_step(lr=0.1, maximize=True)
    assert params == pytest.approx([1.1, -2.0, 2.9], abs=1e-15)


def test_momentum_decides_the_sign() -> None:
    w = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = Lion([w], lr=1.0, betas=(0.9, 0.5))
    for grad in (1.0, -0.05):  # m = 0.5 after step 1, then c = 0.45 - 0.005 > 0 despite g < 0
        w.grad = torch.tensor([grad], dtype=torch.float64)
        opt.step()
    assert w.item() == -2.0
    assert opt.state[w]["exp_avg"].item() == pytest.approx(0.5 * 0.5 - 0.5 * 0.05)


def test_closure_and_skipped_parameters() -> None:
    w, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = Lion([w, frozen], lr=0.5)
    loss = opt.step(lambda: (w**2).sum().backward() or 7.0)
    assert loss == 7.0
    assert w.tolist() == [0.5, 0.5]
    assert frozen.tolist() == [1.0, 1.0]
    assert frozen not in opt.state


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"betas": (0.9, 1.0)}, "Invalid betas"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
    ],
)
def test_invalid_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.ones(1))], **options)


def test_sparse_gradients_are_refused() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Lion([w]).step()


def test_the_rule_keeps_the_graph_to_every_hyperparameter() -> None:
    lr, decay = torch.tensor(0.1, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    hyper = {"lr": lr, "betas": (0.9, 0.99), "weight_decay": decay}
    (p,), state = LION.update([torch.ones(2)], [torch.ones(2)], LION.init([torch.ones(2)], hyper),
                              hyper)  # fmt: skip
    (m,) = state.exp_avg
    d_lr, d_decay = torch.autograd.grad(p.sum(), [lr, decay])
    # p = 1 * (1 - lr * decay) - lr: d/dlr = -decay - 1 per entry, d/ddecay = -lr per entry
    assert d_lr.item() == pytest.approx(2 * (-0.5 - 1))
    assert d_decay.item() == pytest.approx(2 * -0.1)
    assert m.tolist() == pytest.approx([0.01, 0.01])


def test_scheduler_bookkeeping_passes_and_unknown_options_are_refused() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    opt = Lion([w], lr=0.1)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # adds initial_lr, ...
    assert "initial_lr" in opt.param_groups[0]
    assert isinstance(higher.optim.get_diff_optim(opt, [w]), DifferentiableLion)


def test_unknown_options_are_refused_by_the_twin() -> None:
    class LionWithExtra(Lion):
        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, **kwargs)
            for group in self.param_groups:
                group["stable"] = True

    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(higher.optim.UnsupportedOptionError, match=r"option\(s\) \['stable'\]"):
        DifferentiableLion(LionWithExtra([w]), [w])
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        DifferentiableLion(Lion([w]), [w]).step(w.sum(), params=[w], foo=1)


def test_the_entry_point_is_declared() -> None:
    (ep,) = [
        e for e in importlib.metadata.entry_points(group="higher.optimizers")
        if e.name == "higher_lion.Lion"
    ]  # fmt: skip
    assert ep.value == "higher_lion:DifferentiableLion"
    assert ep.load() is DifferentiableLion
    assert f"{Lion.__module__}.{Lion.__qualname__}" == ep.name


def test_higher_finds_the_twin_with_no_registration() -> None:
    # A fresh interpreter: nothing of the plugin is imported until the user makes a Lion.
    code = (
        "import sys, torch, higher.optim\n"
        "assert 'higher_lion' not in sys.modules\n"
        "from higher_lion import Lion\n"
        "w = torch.nn.Parameter(torch.ones(2))\n"
        "print(type(higher.optim.get_diff_optim(Lion([w]), [w])).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DifferentiableLion"
