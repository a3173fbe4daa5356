"""A rule's per-tensor kernel run once over lists of tensors, each op one `torch._foreach_*` op.

`Many` stands in for one tensor in a kernel and holds one tensor per parameter. An op on it runs
as the foreach op torch has for it (one dispatch and one autograd node for every tensor, the same
values as the op on each tensor, derivatives of every order included), or else as the op on each
tensor in turn. `elementwise(..., foreach=True)` uses it in eager mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensors = Sequence[torch.Tensor]
#: what a foreach op takes and returns
TensorList = list[torch.Tensor] | tuple[torch.Tensor, ...]


class NotForeach(Exception):
    """The kernel did what a list of tensors cannot stand in for (a branch on a value)."""


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _each(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """`fn` on each tensor of the lists among `args` and `kwargs`; lists of the results."""
    n = next(len(a.ts) for a in (*args, *kwargs.values()) if isinstance(a, Many))
    outs = [
        fn(
            *[a.ts[i] if isinstance(a, Many) else a for a in args],
            **{k: v.ts[i] if isinstance(v, Many) else v for k, v in kwargs.items()},
        )
        for i in range(n)
    ]
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return Many(outs)
    if isinstance(first, tuple) and all(isinstance(t, torch.Tensor) for t in first):
        return tuple(Many(list(parts)) for parts in zip(*outs, strict=True))
    raise NotForeach(f"{getattr(fn, '__name__', fn)} returned {type(first).__name__} per tensor")


def _binary(
    fused: Callable[..., TensorList], per: Callable[[Any, Any], Any]
) -> Callable[[Many, Any], Any]:
    """`a op b` for a list `a`: the foreach op for a list or a number `b`, else `per` each."""

    def op(a: Many, b: Any) -> Any:
        if isinstance(b, Many):
            return Many(fused(a.ts, b.ts))
        if _number(b):
            return Many(fused(a.ts, b))
        return _each(per, (a, b), {})

    return op


def _on_each(per: Callable[[Any, Any], Any]) -> Callable[[Many, Any], Any]:
    """`a op b` for a list `a`: `per` on each tensor (an op without a foreach form)."""

    def op(a: Many, b: Any) -> Any:
        return _each(per, (a, b), {})

    return op


def _reflected(per: Callable[[Any, Any], Any]) -> Callable[[Many, Any], Any]:
    """`b op a` for a list `a` (a number or a tensor on the left): `per` on each tensor."""

    def op(a: Many, b: Any) -> Any:
        return _each(lambda x, y: per(y, x), (a, b), {})

    return op


def _alpha(fused: Callable[..., TensorList]) -> Callable[..., Any]:
    """`torch.add` / `torch.sub` with `alpha`: the foreach op where both are lists."""

    def op(a: Any, b: Any, *, alpha: Any = 1) -> Any:
        if isinstance(a, Many) and isinstance(b, Many) and _number(alpha):
            return Many(fused(a.ts, b.ts, alpha=alpha))
        return NotImplemented

    return op


def _lerp(a: Any, b: Any, weight: Any) -> Any:
    if isinstance(a, Many) and isinstance(b, Many) and _number(weight):
        return Many(torch._foreach_lerp(a.ts, b.ts, weight))
    return NotImplemented


def _pointwise(fused: Callable[..., TensorList]) -> Callable[..., Any]:
    """`torch.addcmul` (`value` a number): the foreach op over lists."""

    def op(a: Any, b: Any, c: Any, *, value: Any = 1) -> Any:
        if all(isinstance(x, Many) for x in (a, b, c)) and _number(value):
            return Many(fused(a.ts, b.ts, c.ts, value=value))
        return NotImplemented

    return op


def _unary(fused: Callable[..., TensorList]) -> Callable[..., Any]:
    def op(a: Any) -> Any:
        return Many(fused(a.ts)) if isinstance(a, Many) else NotImplemented

    return op


def _maximum(a: Any, b: Any) -> Any:
    if isinstance(a, Many) and isinstance(b, Many):
        return Many(torch._foreach_maximum(a.ts, b.ts))
    return NotImplemented


#: torch functions with a foreach form (else: the function on each tensor)
_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.add: _alpha(torch._foreach_add),
    torch.sub: _alpha(torch._foreach_sub),
    torch.lerp: _lerp,
    torch.addcmul: _pointwise(torch._foreach_addcmul),
    # not torch.addcdiv: the backward of `_foreach_addcdiv` fails on a list holding a tensor of
    # shape (1,) (torch 2.1 to 2.14: "select(): index 1 out of range"); it runs per tensor
    torch.maximum: _maximum,
    torch.sqrt: _unary(torch._foreach_sqrt),
    torch.Tensor.sqrt: _unary(torch._foreach_sqrt),
    torch.neg: _unary(torch._foreach_neg),
}


def _call(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """`func(*args, **kwargs)` with lists among the arguments: its foreach form where it has one
    for these arguments, else `func` on each tensor."""
    fused = _FUNCTIONS.get(func)
    if fused is not None:
        out = fused(*args, **kwargs)
        if out is not NotImplemented:
            return out
    return _each(func, args, kwargs)


class Many:
    """One tensor per parameter, standing in for one tensor in a kernel.

    Examples:
        >>> import torch
        >>> from higher.optim._foreach import Many
        >>> x = Many([torch.ones(2), torch.zeros(3)])
        >>> [t.tolist() for t in (torch.add(x, x, alpha=0.5) * 2).ts]
        [[3.0, 3.0], [0.0, 0.0, 0.0]]
    """

    __slots__ = ("ts",)

    def __init__(self, ts: TensorList) -> None:
        self.ts = ts

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _call(func, args, kwargs or {})

    __add__ = _binary(torch._foreach_add, lambda x, y: x + y)
    __radd__ = _binary(torch._foreach_add, lambda x, y: y + x)  # a number adds either way
    __sub__ = _binary(torch._foreach_sub, lambda x, y: x - y)
    __rsub__ = _reflected(lambda x, y: x - y)
    __mul__ = _binary(torch._foreach_mul, lambda x, y: x * y)
    __rmul__ = _binary(torch._foreach_mul, lambda x, y: y * x)
    __truediv__ = _binary(torch._foreach_div, lambda x, y: x / y)
    __rtruediv__ = _reflected(lambda x, y: x / y)
    __pow__ = _binary(torch._foreach_pow, lambda x, y: x**y)
    __rpow__ = _reflected(lambda x, y: x**y)
    __eq__ = _on_each(lambda x, y: x == y)
    __ne__ = _on_each(lambda x, y: x != y)
    __lt__ = _on_each(lambda x, y: x < y)
    __le__ = _on_each(lambda x, y: x <= y)
    __gt__ = _on_each(lambda x, y: x > y)
    __ge__ = _on_each(lambda x, y: x >= y)
    __hash__ = None  # type: ignore[assignment]

    def __neg__(self) -> Many:
        return Many(torch._foreach_neg(self.ts))

    def __bool__(self) -> bool:
        raise NotForeach("a branch on a tensor's value")

    def __getattr__(self, name: str) -> Any:
        """A tensor method, as the torch function it is (`x.sqrt()` is `torch.Tensor.sqrt(x)`:
        one foreach op); an attribute that every tensor has the same value of (`dtype`)."""
        values = [getattr(t, name) for t in self.ts]
        if callable(values[0]):
            method = getattr(torch.Tensor, name)
            return lambda *args, **kwargs: _call(method, (self, *args), kwargs)
        if all(v == values[0] for v in values):
            return values[0]
        raise NotForeach(f"the tensors' {name} differ")


def sqrt0(x: Many) -> Any:
    """`higher.optim.rule.sqrt0` over a list: `sqrt(x + z) * (x != 0)`, z = (x == 0).

    Where x != 0 that is `sqrt(x) * 1` (the same value and derivatives); where x == 0 it is
    `sqrt(1) * 0` = 0 with every derivative 0, as `sqrt0` gives. What is saved for the backward
    pass is what `sqrt0` saves: the square root and a mask of bools.
    """
    zero = [t == 0 for t in x.ts]  # no graph: a comparison is constant
    nonzero = [torch.logical_not(z) for z in zero]
    return Many(torch._foreach_mul(torch._foreach_sqrt(torch._foreach_add(x.ts, zero)), nonzero))


def usable(params: Tensors, lists: Sequence[Sequence[torch.Tensor] | None]) -> bool:
    """Whether the kernel can run over `params` and `lists` as lists: more than one tensor, no
    missing entry in a list, and eager mode (no `torch.func` transform). Tensors of several
    dtypes or devices are fine: on such lists a foreach op runs the op on each tensor."""
    if len(params) < 2 or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(xs is None or all(x is not None for x in xs) for xs in lists)


def run(
    kernel: Callable[..., tuple[torch.Tensor | None, ...]],
    params: Tensors,
    lists: Sequence[Sequence[torch.Tensor] | None],
) -> list[list[torch.Tensor | None]]:
    """The kernel once over lists; each output a list of tensors (or of None)."""
    outs: Any = kernel(
        Many(list(params)), *[None if xs is None else Many(list(xs)) for xs in lists]
    )
    result: list[list[torch.Tensor | None]] = []
    for out in outs:
        if out is None:
            result.append([None] * len(params))
        elif isinstance(out, Many):
            result.append(list(out.ts))
        else:
            raise NotForeach(f"the kernel returned {type(out).__name__}, not a list of tensors")
    return result
