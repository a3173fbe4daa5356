"""Helpers every update rule shares: one elementwise kernel over many tensors, safe math."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _foreach

Tensors = Sequence[torch.Tensor]
MaybeTensors = Sequence[torch.Tensor] | None


def sqrt0(x: torch.Tensor) -> torch.Tensor:
    """`sqrt(x)` whose derivatives of every order are finite (zero) where `x == 0`.

    The forward value is bit-identical to `x.sqrt()`; only the infinite slope at 0 is replaced.

    Examples:
        >>> import torch
        >>> from higher.optim.rule import sqrt0
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> torch.autograd.grad(sqrt0(x).sum(), x)[0].tolist()
        [0.0, 0.25]
    """
    many: object = x
    if isinstance(many, _foreach.Many):  # a kernel run over lists: the same values, foreach ops
        out: torch.Tensor = _foreach.sqrt0(many)
        return out
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.where(zero, torch.ones_like(x), x).sqrt())


def is_zero(value: object) -> bool:
    """True only for a number equal to 0: a tensor hyperparameter keeps its term (and grad).

    Examples:
        >>> import torch
        >>> from higher.optim.rule import is_zero
        >>> is_zero(0.0), is_zero(torch.tensor(0.0))
        (True, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


# Below this many tensors a per-tensor loop beats concatenating and splitting (measured on CPU:
# 6 tensors of an MLP run 5-10 % faster per tensor, 100 small tensors 2x faster fused).
FUSE_MIN_TENSORS = 16


# Whether kernels that allow it run over lists as foreach ops (`elementwise(..., foreach=True)`).
FOREACH = True


# torch >= 2.3; on older torch `higher.compile_step` refuses to run, so nothing is ever compiled.
_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def compiling() -> bool:
    """Whether `torch.compile` is tracing the caller (then a compiler fuses the kernels).

    Examples:
        >>> from higher.optim.rule import compiling
        >>> compiling()
        False
    """
    return _IS_COMPILING is not None and bool(_IS_COMPILING())


def _fusable(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    if len(tensors) < FUSE_MIN_TENSORS or compiling():  # the compiler fuses kernels itself
        return False
    return all(
        t.dtype == first.dtype and t.device == first.device and not t.is_sparse for t in tensors
    )


def _tiled_base(ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat tensor `ts` are consecutive views of, in order (what the last step returned)."""
    base = ts[0]._base
    if base is None or base.dim() != 1 or base.storage_offset() != 0:
        return None
    offset = 0
    for t in ts:
        if t._base is not base or t.storage_offset() != offset or not t.is_contiguous():
            return None
        offset += t.numel()
    return base if offset == base.numel() else None


def _fuse(ts: Sequence[torch.Tensor], like: Tensors) -> torch.Tensor:
    base = _tiled_base(ts)
    if base is not None:  # in an unroll, the previous step's output: no copy needed
        return base
    return torch.cat(
        [
            (t if t.shape == p.shape else t.expand_as(p)).reshape(-1)
            for t, p in zip(ts, like, strict=True)
        ]
    )


def elementwise(
    kernel: Callable[..., tuple[torch.Tensor | None, ...]],
    params: Tensors,
    *lists: MaybeTensors,
    foreach: bool = False,
) -> list[list[torch.Tensor | None]]:
    """Run an elementwise `kernel(p, *xs) -> outputs` over every parameter; transpose the result.

    When the tensors share a dtype and a device the kernel runs once on their concatenation (a
    handful of large ops instead of a handful per tensor, and as differentiable), else once per
    tensor; complex tensors run as real pairs, as torch runs them. A list given as None reaches
    the kernel as None. Each output is a list of tensors shaped like `params` (or of None).

    With `foreach=True` the kernel may instead run once with each argument a list of tensors
    standing in for one tensor: each arithmetic op and torch function it calls is then one
    `torch._foreach_*` op over every tensor where torch has one (the same values, one autograd
    node instead of one per tensor), else that op once per tensor. Set it for a kernel that
    only computes (no branch on a tensor's value) and tells a number from a tensor with
    `isinstance(x, (int, float))`, never `isinstance(x, torch.Tensor)`. It is used in eager
    mode (not while compiling, not under `vmap` or another `torch.func` transform).

    Examples:
        >>> import torch
        >>> from higher.optim.rule import elementwise
        >>> new_p, new_m = elementwise(
        ...     lambda p, g, m: (p - 0.5 * g, 0.9 * m + g),
        ...     [torch.ones(2)], [torch.ones(2)], [torch.zeros(2)])
        >>> new_p[0].tolist(), new_m[0].tolist()
        ([0.5, 0.5], [1.0, 1.0])
    """
    if not params:
        return []
    if any(p.is_complex() for p in params):
        return _as_real_pairs(kernel, params, lists, foreach)
    if foreach and FOREACH and not compiling() and _foreach.usable(params, lists):
        try:
            return _foreach.run(kernel, params, lists)
        except _foreach.NotForeach:  # the kernel needs each tensor on its own: run it so
            pass
    elif _fusable(params):
        return _fused(kernel, params, lists)
    return _per_tensor(kernel, params, lists)


def _as_real_pairs(
    kernel: Callable[..., tuple[torch.Tensor | None, ...]],
    params: Tensors,
    lists: tuple[MaybeTensors, ...],
    foreach: bool,
) -> list[list[torch.Tensor | None]]:
    """`elementwise` over complex tensors viewed as real pairs, the outputs viewed back; a real
    tensor beside a complex parameter (a per-parameter learning rate) serves both halves."""
    real = [torch.view_as_real(p) if p.is_complex() else p for p in params]
    real_lists = [
        None
        if xs is None
        else [
            torch.view_as_real(x) if x.is_complex() else x.unsqueeze(-1) if p.is_complex() else x
            for x, p in zip(xs, params, strict=True)
        ]
        for xs in lists
    ]
    real_outs = elementwise(kernel, real, *real_lists, foreach=foreach)
    return [
        [
            None if x is None else torch.view_as_complex(x) if p.is_complex() else x
            for x, p in zip(out, params, strict=True)
        ]
        for out in real_outs
    ]


def _fused(
    kernel: Callable[..., tuple[torch.Tensor | None, ...]],
    params: Tensors,
    lists: tuple[MaybeTensors, ...],
) -> list[list[torch.Tensor | None]]:
    """The kernel once over the concatenated tensors; each output split back per parameter."""
    flat = [_fuse(params, params)] + [None if xs is None else _fuse(xs, params) for xs in lists]
    outs = kernel(*flat)
    sizes = [p.numel() for p in params]
    result: list[list[torch.Tensor | None]] = []
    for out in outs:
        if out is None:
            result.append([None] * len(params))
        else:
            parts = torch.split(out, sizes)
            result.append([part.view(p.shape) for part, p in zip(parts, params, strict=True)])
    return result


def _per_tensor(
    kernel: Callable[..., tuple[torch.Tensor | None, ...]],
    params: Tensors,
    lists: tuple[MaybeTensors, ...],
) -> list[list[torch.Tensor | None]]:
    """The kernel once per parameter; the outputs transposed into one list per output."""
    per = [
        kernel(p, *[None if xs is None else xs[i] for xs in lists]) for i, p in enumerate(params)
    ]
    return [[outs[k] for outs in per] for k in range(len(per[0]))]


def some(xs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The list with its None entries checked away (for a kernel output that is always set).

    Examples:
        >>> import torch
        >>> from higher.optim.rule import some
        >>> len(some([torch.ones(1), torch.zeros(1)]))
        2
    """
    out: list[torch.Tensor] = []
    for x in xs:
        assert x is not None
        out.append(x)
    return out
