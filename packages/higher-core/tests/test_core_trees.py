"""The tree module (`higher._trees`, over torch's pytree) and walks that leave no reference cycles.

A recursive closure is a reference cycle (the function holds the cell that holds it): what it
captured (tensors, hyperparameters) stays alive until the cycle collector runs.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

import higher.optim
from higher._fast.metastep import _tensor_counts
from higher._trees import flatten, map_leaves, tensors, unflatten


class _State(NamedTuple):
    step: int
    moments: list[torch.Tensor]
    extra: Any


def _garbage(fn: Callable[[], Any]) -> int:
    """How many objects only the cycle collector would free after `fn()`."""
    gc.collect()
    gc.disable()
    try:
        fn()
        return gc.collect()
    finally:
        gc.enable()


def test_flatten_takes_the_tensors_out_and_unflatten_puts_them_back() -> None:
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 5.0)
    tree = [_State(3, [a, b], None), {"x": (c, 2.5)}]
    leaves, spec = flatten(tree)
    assert leaves == [a, b, c] or all(x is y for x, y in zip(leaves, [a, b, c]))
    new = [t + 1 for t in leaves]
    rebuilt = unflatten(spec, new)
    assert isinstance(rebuilt[0], _State) and rebuilt[0].step == 3 and rebuilt[0].extra is None
    assert rebuilt[0].moments[0] is new[0] and rebuilt[0].moments[1] is new[1]
    assert rebuilt[1]["x"][0] is new[2] and rebuilt[1]["x"][1] == 2.5
    assert [t is x for t, x in zip(tensors(tree), [a, b, c])] == [True] * 3
    with pytest.raises(ValueError, match="more leaves"):
        unflatten(spec, [*new, torch.ones(1)])


def test_map_leaves_keeps_the_containers() -> None:
    out = map_leaves(lambda x: x * 10 if isinstance(x, int) else x, _State(2, [], {"k": (1,)}))
    assert out == _State(20, [], {"k": (10,)})


def test_step_counts_become_tensors_without_a_reference_cycle() -> None:
    t = torch.ones(2)
    states = [_State(4, [t], None)]
    (done,) = _tensor_counts(states)
    assert isinstance(done.step, torch.Tensor) and done.step.dtype == torch.float64
    assert done.step.item() == 4.0 and done.moments[0] is t
    count = torch.tensor(1.0)
    alive = weakref.ref(count)
    gc.collect()
    gc.disable()
    try:
        (shifted,) = _tensor_counts(states, count=count)
        assert shifted.step.item() == 5.0
        del count, shifted
        assert alive() is None  # freed by reference counting: no cycle holds it
    finally:
        gc.enable()


def test_apply_trainable_opt_params_leaves_no_reference_cycle() -> None:
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    hyper = higher.optim.get_trainable_opt_params(opt)
    assert _garbage(lambda: higher.optim.apply_trainable_opt_params(opt, hyper)) == 0
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.999))
    assert isinstance(opt.param_groups[0]["betas"][0], float)
