"""`step(closure=...)` and `gradients`: the loss as torch.optim takes it, and the gradients
`step` takes, for code that drives the step protocol itself."""

from __future__ import annotations

import pytest
import torch

import higher.optim


def _pair() -> tuple[torch.nn.Parameter, higher.optim.DifferentiableOptimizer]:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    return w, higher.optim.get_diff_optim(torch.optim.Adam([w], lr=0.1), [w])


def test_closure_step_equals_loss_step() -> None:
    w, by_loss = _pair()
    _, by_closure = _pair()
    a = by_loss.step((w**3).sum(), params=[w])
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return (w**3).sum()

    with torch.no_grad():  # the closure runs with grad enabled, as torch.optim's does
        b = by_closure.step(closure=closure, params=[w])
    assert calls == [True]
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert by_closure.state[0][0]["step"] == 1


def test_closure_refusals_change_nothing() -> None:
    w, diffopt = _pair()
    with pytest.raises(higher.optim.OptimError, match="not both"):
        diffopt.step((w**2).sum(), params=[w], closure=lambda: (w**2).sum())
    with pytest.raises(higher.optim.OptimError, match=r"step\(closure=lambda"):
        diffopt.step(params=[w])
    with pytest.raises(higher.optim.ArgumentTypeError, match="callable"):
        diffopt.step(params=[w], closure=3)  # type: ignore[arg-type]
    assert not diffopt.state[0]


def test_gradients_are_steps_gradients() -> None:
    w, diffopt = _pair()
    v = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64), requires_grad=False)
    (g,) = diffopt.gradients((w**3).sum(), [w])
    assert g is not None
    torch.testing.assert_close(g, 3 * w.detach() ** 2)
    assert g.requires_grad  # track_higher_grads: the graph is kept by default
    (h,) = diffopt.gradients((w**3).sum(), [w], create_graph=False)
    assert h is not None and not h.requires_grad
    halved = diffopt.gradients(
        (w**3).sum(), [w], grad_callback=lambda gs: [x * 0.5 if x is not None else x for x in gs]
    )
    assert halved[0] is not None
    torch.testing.assert_close(halved[0], g * 0.5)
    with pytest.raises(higher.optim.OptimError, match="returned 2 gradients; expected 1"):
        diffopt.gradients((w**3).sum(), [w], grad_callback=lambda gs: [*gs, None])
    with pytest.raises(higher.optim.OptimError, match="scalar"):
        diffopt.gradients(w**3, [w])
    with pytest.raises(higher.optim.OptimError, match="depends on none"):
        diffopt.gradients((v * 2).sum() + torch.ones((), requires_grad=True), [w])
