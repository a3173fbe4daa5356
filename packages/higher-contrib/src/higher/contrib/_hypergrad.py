"""Finite-difference checks of hypergradients: autograd against float64 central differences."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from higher.errors import HigherError

from ._errors import ContribError

Inputs = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class GradientEntry:
    """One compared number: an entry of one tensor's gradient, or its derivative along a direction.

    Attributes:
        tensor: the input's name (its key, or `inputs[i]` for a sequence of inputs).
        index: the entry's index in the tensor; `None` for a random direction.
        direction: which random direction (0, 1, ...); `None` for an entry.
        autograd: what autograd says.
        finite_difference: what float64 central differences say.
        abs_error: `|autograd - finite_difference|`.
        rel_error: `abs_error / |finite_difference|` (0 where both are 0, inf where only it is).
        ok: `abs_error <= atol + rtol * |finite_difference|`, both finite.

    Examples:
        >>> import torch, higher.contrib
        >>> report = higher.contrib.hypergradient_report(lambda x: x.sum(), {"x": torch.ones(2)})
        >>> report.entries[1].where, round(report.entries[1].finite_difference, 6)
        ('x[1]', 1.0)
    """

    tensor: str
    index: tuple[int, ...] | None
    direction: int | None
    autograd: float
    finite_difference: float
    abs_error: float
    rel_error: float
    ok: bool

    @property
    def where(self) -> str:
        """Where the number lives: `w[1, 0]`, `lr` (a scalar) or `w along direction 2`."""
        if self.index is None:
            return f"{self.tensor} along direction {self.direction}"
        if not self.index:
            return self.tensor
        return f"{self.tensor}[{', '.join(map(str, self.index))}]"


@dataclass(frozen=True)
class HypergradientReport:
    """Every number a hypergradient check compared, and the tolerances it used.

    Examples:
        >>> import torch, higher.contrib
        >>> report = higher.contrib.hypergradient_report(lambda x: (x**3).sum(), [torch.ones(3)])
        >>> report.ok, len(report.entries), report.failures
        (True, 3, ())
    """

    loss: float
    entries: tuple[GradientEntry, ...]
    eps: float
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        """True when every compared number agrees within the tolerances."""
        return all(e.ok for e in self.entries)

    @property
    def failures(self) -> tuple[GradientEntry, ...]:
        """The numbers that disagree, worst (largest absolute error) first."""
        bad = [e for e in self.entries if not e.ok]
        return tuple(sorted(bad, key=lambda e: -_sort_key(e.abs_error)))

    def worst(self) -> GradientEntry | None:
        """The number with the largest relative error, or None when nothing was compared."""
        return max(self.entries, key=lambda e: _sort_key(e.rel_error), default=None)

    def summary(self, limit: int = 10) -> str:
        """A readable account: a headline, then up to `limit` rows (failures, else the worst)."""
        tol = f"atol={self.atol:g}, rtol={self.rtol:g}, eps={self.eps:g}"
        n = len(self.entries)
        if self.ok:
            worst = self.worst()
            tail = (
                "" if worst is None else f"; worst: {worst.where} rel error {worst.rel_error:.2e}"
            )
            return f"hypergradient check passed: {n} numbers agree ({tol}){tail}"
        bad = self.failures
        lines = [
            f"hypergradient check failed: {len(bad)} of {n} numbers differ ({tol}); "
            f"meta-loss {self.loss:.6g}",
            f"  {'where':<28} {'autograd':>15} {'finite diff':>15} {'abs error':>10} "
            f"{'rel error':>10}",
        ]
        for e in bad[:limit]:
            lines.append(
                f"  {e.where:<28} {e.autograd:>15.8e} {e.finite_difference:>15.8e} "
                f"{e.abs_error:>10.2e} {e.rel_error:>10.2e}"
            )
        if len(bad) > limit:
            lines.append(f"  ... and {len(bad) - limit} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def raise_if_failed(self) -> None:
        """Raise `HypergradientMismatch` (with this report) unless every number agrees."""
        if not self.ok:
            raise HypergradientMismatch(self)


class HypergradientMismatch(HigherError, AssertionError):
    """Autograd and finite differences disagree; `report` holds every compared number.

    It is an `AssertionError`, so pytest shows it as a failed check.

    Examples:
        >>> import torch, higher.contrib
        >>> wrong = lambda x: (x**2).sum() + (x.detach() ** 2).sum()  # autograd misses half
        >>> try:
        ...     higher.contrib.check_hypergradient(wrong, {"x": torch.ones(2)})
        ... except higher.contrib.HypergradientMismatch as err:
        ...     print(err.report.failures[0].tensor)
        x
    """

    __module__ = "higher.contrib"  # its public path, for tracebacks, pickle and the docs

    def __init__(self, report: HypergradientReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self) -> tuple[type, tuple[HypergradientReport]]:  # pickles with its report
        return type(self), (self.report,)


def _sort_key(x: float) -> float:
    return math.inf if math.isnan(x) else x


def hypergradient_report(
    fn: Callable[..., torch.Tensor],
    inputs: Inputs,
    *,
    wrt: Iterable[str | int] | None = None,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    max_entries: int = 64,
    directions: int = 3,
    seed: int = 0,
) -> HypergradientReport:
    """Compare autograd's gradient of a scalar meta-loss with float64 central differences.

    `fn` maps tensors (initial weights, hyperparameters, data: whatever the meta-loss depends on)
    to a scalar tensor; it is called with `fn(*inputs)` for a sequence, `fn(**inputs)` for a
    mapping. Every floating input is passed as a fresh float64 leaf that requires grad (a copy:
    the caller's tensors are never touched), so `fn` must compute in float64 throughout
    (`model.double()`); it is called with gradients enabled, so it may unroll an inner loop that
    differentiates by any input, and it must be deterministic. A tensor of at most
    `max_entries` entries is checked entry by entry (two calls of `fn` each); a larger one along
    `directions` random unit directions (the directional derivative `<grad, v>`, two calls
    each). A number agrees when
    `|autograd - fd| <= atol + rtol * |fd|`.

    Args:
        fn: the meta-loss, as a function of the inputs.
        inputs: the point to check at: a sequence or a name -> tensor mapping.
        wrt: names (mapping) or positions (sequence) to differentiate by; default every
            floating-point input.
        eps: the finite-difference step.
        atol: the absolute tolerance.
        rtol: the relative tolerance.
        max_entries: larger tensors are checked along random directions instead of entrywise.
        directions: how many random directions per large tensor.
        seed: seeds the random directions.

    Returns:
        A `HypergradientReport`; it never raises for a mismatch (`check_hypergradient` does).

    Raises:
        ContribError: an input is no tensor, `wrt` names an unknown or non-floating input, or
            `fn` returns no scalar float64 tensor.

    Examples:
        >>> import torch, higher.contrib
        >>> def meta_loss(lr, w):  # one SGD step on (w - 1)^2, then the loss
        ...     w1 = w - lr * 2 * (w - 1)
        ...     return ((w1 - 1) ** 2).sum()
        >>> report = higher.contrib.hypergradient_report(
        ...     meta_loss, {"lr": torch.tensor(0.1), "w": torch.zeros(2)}
        ... )
        >>> report.ok, [e.where for e in report.entries]
        (True, ['lr', 'w[0]', 'w[1]'])
    """
    if eps <= 0 or atol < 0 or rtol < 0 or max_entries < 0 or directions < 1:
        raise ContribError(
            "expected eps > 0, atol >= 0, rtol >= 0, max_entries >= 0 and directions >= 1, "
            f"got eps={eps}, atol={atol}, rtol={rtol}, max_entries={max_entries}, "
            f"directions={directions}"
        )
    names, given = _named(inputs)
    checked = _wrt(names, given, wrt)
    point = {
        n: t.detach().to(torch.float64) if t.is_floating_point() else t for n, t in given.items()
    }

    def at(shift: str | None = None, delta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        args = {}
        for n, t in point.items():
            if t.is_floating_point():  # fresh leaves each call: fn may modify or keep them
                t = t + delta if n == shift and delta is not None else t.clone()
                t.requires_grad_(True)
            args[n] = t
        return args

    def call(args: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            out = fn(**args) if isinstance(inputs, Mapping) else fn(*args.values())
        return _checked_output(out)

    def diff(name: str, delta: torch.Tensor) -> float:
        up, down = call(at(name, delta)).detach().item(), call(at(name, -delta)).detach().item()
        return (up - down) / (2 * eps)

    args = at()
    out = call(args)
    grads = _grads(out, [args[n] for n in checked])
    entries: list[GradientEntry] = []
    for name, grad in zip(checked, grads):
        x = point[name]
        if x.numel() <= max_entries:
            for i in range(x.numel()):
                delta = torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # row-major
                delta.view(-1)[i] = eps
                ag = grad.reshape(-1)[i].item()
                index = _unravel(i, x.shape)
                entries.append(_entry(name, index, None, ag, diff(name, delta), atol, rtol))
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            for k in range(directions):
                v = torch.randn(x.shape, dtype=torch.float64, generator=gen).to(x.device)
                v = v / v.norm()
                ag = (grad * v).sum().item()
                entries.append(_entry(name, None, k, ag, diff(name, eps * v), atol, rtol))
    return HypergradientReport(out.detach().item(), tuple(entries), eps, atol, rtol)


def check_hypergradient(
    fn: Callable[..., torch.Tensor],
    inputs: Inputs,
    *,
    wrt: Iterable[str | int] | None = None,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    max_entries: int = 64,
    directions: int = 3,
    seed: int = 0,
) -> HypergradientReport:
    """`hypergradient_report`, raising `HypergradientMismatch` when a number disagrees.

    The arguments are `hypergradient_report`'s. Returns the report when everything agrees.

    Examples:
        >>> import torch, higher.contrib
        >>> report = higher.contrib.check_hypergradient(
        ...     lambda w, x: torch.tanh(w @ x), [torch.ones(3), torch.arange(3.0)], wrt=[0]
        ... )
        >>> len(report.entries)
        3
    """
    report = hypergradient_report(
        fn, inputs, wrt=wrt, eps=eps, atol=atol, rtol=rtol,
        max_entries=max_entries, directions=directions, seed=seed,
    )  # fmt: skip
    report.raise_if_failed()
    return report


def _named(inputs: Inputs) -> tuple[list[str], dict[str, torch.Tensor]]:
    if isinstance(inputs, Mapping):
        items = [(str(k), v) for k, v in inputs.items()]
    elif isinstance(inputs, Sequence):
        items = [(f"inputs[{i}]", v) for i, v in enumerate(inputs)]
    else:
        raise ContribError(
            "expected inputs as a sequence or a name -> tensor mapping, "
            f"got {type(inputs).__name__}"
        )
    for name, value in items:
        if not isinstance(value, torch.Tensor):
            raise ContribError(f"expected a tensor for input {name}, got {type(value).__name__}")
    return [n for n, _ in items], dict(items)


def _wrt(
    names: list[str], given: dict[str, torch.Tensor], wrt: Iterable[str | int] | None
) -> list[str]:
    if wrt is None:
        chosen = [n for n in names if given[n].is_floating_point()]
    else:
        chosen = []
        for key in wrt:
            if (
                isinstance(key, int)
                and not isinstance(key, bool)
                and -len(names) <= key < len(names)
            ):
                chosen.append(names[key])
            elif isinstance(key, str) and key in given:
                chosen.append(key)
            else:
                raise ContribError(f"wrt names no input: {key!r}; the inputs are {names}")
        for n in chosen:
            if not given[n].is_floating_point():
                raise ContribError(
                    f"cannot differentiate by input {n}: its dtype {given[n].dtype} is not floating"
                )
    if not chosen:
        raise ContribError(f"nothing to check: no floating-point input among {names}")
    return list(dict.fromkeys(chosen))


def _checked_output(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ContribError(f"expected fn to return a scalar tensor (the meta-loss), got {got}")
    if out.dtype != torch.float64:
        raise ContribError(
            f"expected fn to return a float64 meta-loss, got {out.dtype}: finite differences need "
            "float64 throughout, so make every tensor fn creates float64 (e.g. model.double())"
        )
    return out


def _grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    if not out.requires_grad:  # the meta-loss depends on none of the checked inputs
        return [torch.zeros_like(x) for x in leaves]
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(leaves, grads)]


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, k = divmod(flat, size)
        index.append(k)
    return tuple(reversed(index))


def _entry(
    tensor: str,
    index: tuple[int, ...] | None,
    direction: int | None,
    autograd: float,
    fd: float,
    atol: float,
    rtol: float,
) -> GradientEntry:
    err = abs(autograd - fd)
    rel = err / abs(fd) if fd != 0 else (0.0 if err == 0 else math.inf)
    ok = math.isfinite(autograd) and math.isfinite(fd) and err <= atol + rtol * abs(fd)
    return GradientEntry(tensor, index, direction, autograd, fd, err, rel, ok)
