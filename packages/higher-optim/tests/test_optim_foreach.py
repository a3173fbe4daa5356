"""A rule's kernel run over lists of tensors (`elementwise(..., foreach=True)`): every op gives
the values, and the derivatives of first and second order, of the op on each tensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import higher.optim
from higher.optim import _foreach
from higher.optim.rule import elementwise, sqrt0

SHAPES = [(3, 4), (1,), (), (2, 1)]
D = torch.float64


def _tensors(seed: int, positive: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen, dtype=D) for s in SHAPES]
    return [(t.abs() + 0.5 if positive else t).requires_grad_() for t in out]


#: name -> the kernel, written once for one tensor (x, y positive where an op needs it)
KERNELS: dict[str, Callable[[Any, Any], Any]] = {
    "add": lambda x, y: x + y,
    "add number": lambda x, y: x + 0.25,
    "radd number": lambda x, y: 0.25 + x,
    "sub": lambda x, y: x - y,
    "rsub number": lambda x, y: 1 - x,
    "mul": lambda x, y: x * y,
    "mul number": lambda x, y: x * 0.9,
    "rmul number": lambda x, y: 0.9 * x,
    "div": lambda x, y: x / y,
    "div number": lambda x, y: x / 0.3,
    "rdiv number": lambda x, y: 2.0 / y,
    "neg": lambda x, y: -x,
    "pow": lambda x, y: x**2,
    "add alpha": lambda x, y: torch.add(x, y, alpha=-0.3),
    "sub alpha": lambda x, y: torch.sub(x, y, alpha=0.7),
    "lerp": lambda x, y: torch.lerp(x, y, 0.1),
    "addcmul": lambda x, y: torch.addcmul(x, y, y, value=-0.2),
    "addcdiv": lambda x, y: torch.addcdiv(x, x, y, value=-0.2),
    "maximum": lambda x, y: torch.maximum(x, y),
    "sqrt": lambda x, y: torch.sqrt(y),
    "sqrt method": lambda x, y: y.sqrt(),
    "sqrt0": lambda x, y: sqrt0(y * (x > 0)),  # zeros included: derivatives 0 there
    "where": lambda x, y: torch.where(x > 0, x, y),
    "clamp": lambda x, y: torch.clamp(x, min=0.1),
    "exp method": lambda x, y: x.exp(),
    "tensor times list": lambda x, y: torch.tensor(0.5, dtype=D) * x,
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_each_op_over_lists_equals_the_op_on_each_tensor(name: str) -> None:
    kernel = KERNELS[name]
    xs, ys = _tensors(0), _tensors(1, positive=True)
    over_lists = _foreach.Many(xs), _foreach.Many(ys)
    got = kernel(*over_lists).ts
    want = [kernel(x, y) for x, y in zip(xs, ys, strict=True)]
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), name

    def derivatives(outs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights = [torch.linspace(-1, 2, o.numel(), dtype=D).view(o.shape) for o in outs]
        total = torch.stack([(o * w).sum() for o, w in zip(outs, weights, strict=True)]).sum()
        found = torch.autograd.grad(total, [*xs, *ys], create_graph=True, allow_unused=True)
        first = [torch.zeros_like(t) if g is None else g for g, t in zip(found, [*xs, *ys])]
        second_of = sum((g**2).sum() for g in first if g.requires_grad)
        if not isinstance(second_of, torch.Tensor):  # a linear op: no second derivative
            return first, []
        second = torch.autograd.grad(second_of, [*xs, *ys], allow_unused=True)
        return first, [torch.zeros_like(t) if g is None else g for g, t in zip(second, [*xs, *ys])]

    (got_1, got_2), (want_1, want_2) = derivatives(got), derivatives(want)
    for g, w in zip([*got_1, *got_2], [*want_1, *want_2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-15)


def test_a_kernel_that_branches_on_a_value_runs_on_each_tensor() -> None:
    def kernel(p: Any, g: Any) -> tuple[Any]:
        return (p - g if bool((g > 0).all()) else p + g,)

    params, grads = _tensors(2), [t.detach().abs() for t in _tensors(3)]
    grads[1] = -grads[1]
    (got,) = elementwise(kernel, params, grads, foreach=True)
    want = [kernel(p, g)[0] for p, g in zip(params, grads, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))  # type: ignore[arg-type]


def _nodes(outputs: list[torch.Tensor]) -> int:
    """Autograd nodes behind `outputs` (each node object held while counted: an id is unique
    only among live objects)."""
    seen: list[Any] = []
    ids: set[int] = set()
    stack = [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in ids:
            continue
        seen.append(node)
        ids.add(id(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def _adam_step(foreach: bool, monkeypatch: pytest.MonkeyPatch, **options: Any) -> list[Any]:
    monkeypatch.setattr(higher.optim._kernel, "FOREACH", foreach)
    params = [torch.nn.Parameter(t.detach()) for t in _tensors(4)]
    diffopt = higher.optim.get_diff_optim(torch.optim.Adam(params, lr=0.1, **options), params)
    grads = [(p**3).detach().requires_grad_() for p in params]  # leaves: only the update's graph
    plan = higher.optim.internal.plan(diffopt, params)
    return plan.update(params, grads).params


@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "weight_decay": 0.1}])
def test_an_update_over_lists_has_fewer_autograd_nodes(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_lists = _adam_step(True, monkeypatch, **options)
    per_tensor = _adam_step(False, monkeypatch, **options)
    assert all(torch.equal(a, b) for a, b in zip(as_lists, per_tensor, strict=True))
    # per tensor: about a dozen nodes for each of the 4 tensors; over lists: a few in all
    assert _nodes(as_lists) < _nodes(per_tensor) / 2, (_nodes(as_lists), _nodes(per_tensor))


def test_under_vmap_a_kernel_runs_on_each_tensor() -> None:
    seen: list[type] = []

    def kernel(p: Any, g: Any) -> tuple[Any]:
        seen.append(type(p))
        return (torch.add(p, g, alpha=-0.5),)

    def update(ps: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        (new,) = elementwise(kernel, [ps[0], ps[1]], [gs[0], gs[1]], foreach=True)
        return torch.stack(new)  # type: ignore[arg-type]

    ps, gs = torch.randn(3, 2, 5, dtype=D), torch.randn(3, 2, 5, dtype=D)
    got = torch.func.vmap(update)(ps, gs)
    torch.testing.assert_close(got, ps - 0.5 * gs, rtol=0, atol=1e-15)
    assert _foreach.Many not in seen


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_meta_gradients_over_lists_equal_those_per_tensor(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5-step unroll with learnable per-parameter learning rates: the meta-gradients with
    respect to the initial weights and the learning rates agree whichever way the rule runs."""

    def meta_gradients(foreach: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(higher.optim._kernel, "FOREACH", foreach)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        net.double()
        params = list(net.parameters())
        lrs = [torch.tensor(0.05, dtype=D, requires_grad=True) for _ in params]
        opt = getattr(torch.optim, name)(params, lr=0.05)
        x, y = torch.randn(8, 3, dtype=D), torch.randn(8, 1, dtype=D)
        fmodel = higher.patch.monkeypatch(net, copy_initial_weights=False)
        diffopt = higher.optim.get_diff_optim(opt, params, fmodel=fmodel, override={"lr": [lrs]})
        for _ in range(5):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        return list(torch.autograd.grad(((fmodel(x) - y) ** 2).mean(), [*params, *lrs]))

    for a, b in zip(meta_gradients(True), meta_gradients(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
