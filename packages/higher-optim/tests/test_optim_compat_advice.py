"""The deprecation warnings of 0.2.1's `_add`, `_addcdiv` and `_addcmul` advise an expression that
gives the helper's numbers bit for bit, and say that torch's one-call form changes them."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import pytest
import torch

import higher.optim

T = torch.Tensor
# helper name -> (call of the helper, the torch one-call form the warning must say rounds otherwise)
HELPERS: dict[str, tuple[Callable[[T, float | T, T, T], T], str]] = {
    "_add": (lambda t, v, a, b: higher.optim._add(t, v, a), "torch.add("),
    "_addcdiv": (lambda t, v, a, b: higher.optim._addcdiv(t, v, a, b), "torch.addcdiv("),
    "_addcmul": (lambda t, v, a, b: higher.optim._addcmul(t, v, a, b), "torch.addcmul("),
}


def advice(name: str, call: Callable[[], T]) -> tuple[T, str, str]:
    """The helper's output, the advised expression and the whole warning."""
    with pytest.warns(DeprecationWarning, match=f"higher.optim.{name}") as record:
        out = call()
    message = str(record[0].message)
    found = re.search(r"use `([^`]+)`", message)
    assert found, message
    return out, found.group(1), message


@pytest.mark.parametrize("name", list(HELPERS))
@pytest.mark.parametrize("seed", range(3))
def test_advised_expression_reproduces_the_helper_bit_for_bit(name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    t, a, b = (torch.randn(100_000, generator=gen, dtype=torch.float32) for _ in range(3))
    b = b.abs() + 0.1  # a divisor away from 0
    helper, torch_form = HELPERS[name]
    for value in (-0.0173 * (seed + 1), torch.tensor(0.37 + seed, dtype=torch.float32)):
        out, expression, message = advice(name, functools.partial(helper, t, value, a, b))
        names = {"tensor": t, "value": value, "other": a, "tensor1": a, "tensor2": b}
        assert torch.equal(eval(expression, {}, names), out), expression
        assert torch_form in message and "rounding" in message
