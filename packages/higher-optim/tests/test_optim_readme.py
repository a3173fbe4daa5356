"""The README's quickstart and worked plugin twin run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

README = Path(__file__).parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_quickstart_runs_and_reaches_the_learning_rate() -> None:
    scope: dict[str, Any] = {}
    exec(_python_blocks()[0], scope)
    assert scope["w"].grad is not None and scope["lr"].grad is not None
    assert torch.isfinite(scope["lr"].grad)


def test_worked_twin_equals_the_test_plugin_lion() -> None:
    from higher_optim_testplugin.optimizers import Lion

    import higher.optim

    scope: dict[str, Any] = {}
    exec(_python_blocks()[1], scope)
    twin = scope["DifferentiableLion"]
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = Lion([w], lr=0.1, weight_decay=0.1)
    diffopt = twin(opt, [w])
    assert isinstance(diffopt, higher.optim.DifferentiableOptimizer)
    params = [w.detach().clone().requires_grad_()]
    for k in range(5):
        opt.zero_grad()
        torch.autograd.backward(((w - k) ** 3).sum())
        opt.step()
        params = diffopt.step(((params[0] - k) ** 3).sum(), params=params)
    torch.testing.assert_close(params[0], w.detach(), rtol=1e-12, atol=1e-12)
