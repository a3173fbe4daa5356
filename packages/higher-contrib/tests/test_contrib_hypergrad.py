"""Finite-difference hypergradient checks: right gradients pass, wrong ones fail, readably."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from higher.contrib import (
    ContribError,
    HigherError,
    HypergradientMismatch,
    check_hypergradient,
    hypergradient_report,
)


class ScaledGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale`: a planted autograd bug."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scaled_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    out: torch.Tensor = ScaledGrad.apply(x, scale)  # type: ignore[no-untyped-call]
    return out


def cubic(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (a * w**3).sum() + (w[0, 1] * w[1, 0]) * a


def test_a_right_gradient_passes_and_the_numbers_are_the_gradient() -> None:
    a, w = torch.tensor(1.5), torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    report = check_hypergradient(cubic, {"a": a, "w": w})
    assert report.ok
    assert [e.where for e in report.entries] == ["a", "w[0, 0]", "w[0, 1]", "w[1, 0]", "w[1, 1]"]
    w64 = w.double()
    expected = [(w64**3).sum() + w64[0, 1] * w64[1, 0]]
    grad_w = 3 * 1.5 * w64**2
    grad_w[0, 1] += 1.5 * w64[1, 0]
    grad_w[1, 0] += 1.5 * w64[0, 1]
    expected += list(grad_w.reshape(-1))
    for entry, want in zip(report.entries, expected):
        assert entry.autograd == pytest.approx(want.item(), rel=1e-12)
        assert entry.finite_difference == pytest.approx(want.item(), rel=1e-7)
        assert entry.abs_error == abs(entry.autograd - entry.finite_difference)
    assert report.loss == pytest.approx(cubic(a.double(), w64).item(), rel=1e-12)


def test_a_wrong_gradient_fails_and_says_where() -> None:
    def wrong(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        planted = torch.cat([w[:1], scaled_grad(w[1:], 1.1)])  # bug in row 1 only
        return cubic(a, planted)

    with pytest.raises(HypergradientMismatch) as info:
        check_hypergradient(wrong, {"a": torch.tensor(1.5), "w": torch.ones(2, 2)})
    err = info.value
    assert isinstance(err, AssertionError)
    assert isinstance(err, HigherError)
    assert sorted(e.where for e in err.report.failures) == ["w[1, 0]", "w[1, 1]"]
    for entry in err.report.failures:  # the planted bug is a 10% error, seen as such
        assert entry.autograd == pytest.approx(1.1 * entry.finite_difference, rel=1e-6)
        assert entry.rel_error == pytest.approx(0.1, rel=1e-5)
    message = str(err)
    assert message.startswith("hypergradient check failed: 2 of 5 numbers differ")
    assert "w[1, 0]" in message
    assert "w[0, 0]" not in message
    assert "rel error" in message


def test_tolerances_decide() -> None:
    def off(w: torch.Tensor) -> torch.Tensor:
        return (scaled_grad(w, 1 + 1e-4) ** 2).sum()

    inputs = [torch.tensor([1.0, 2.0])]
    assert hypergradient_report(off, inputs, rtol=1e-3).ok
    report = hypergradient_report(off, inputs, rtol=1e-6, atol=0.0)
    assert not report.ok
    assert len(report.failures) == 2
    assert hypergradient_report(off, inputs, rtol=0.0, atol=1e-3).ok


def test_large_tensors_are_checked_along_random_directions() -> None:
    w = torch.linspace(-1, 1, 100)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return torch.sin(w).pow(2).sum()

    report = check_hypergradient(loss, {"w": w}, directions=4, max_entries=50)
    assert [e.where for e in report.entries] == [f"w along direction {k}" for k in range(4)]
    grad = torch.sin(2 * w.double())
    gen = torch.Generator().manual_seed(0)
    for entry in report.entries:
        v = torch.randn(100, dtype=torch.float64, generator=gen)
        assert entry.autograd == pytest.approx((grad @ (v / v.norm())).item(), rel=1e-10)
    same = hypergradient_report(loss, {"w": w}, directions=4, max_entries=50)
    assert same.entries == report.entries
    other = hypergradient_report(loss, {"w": w}, directions=4, max_entries=50, seed=1)
    assert other.entries[0].autograd != report.entries[0].autograd
    # a planted bug is found along directions too
    with pytest.raises(HypergradientMismatch, match="w along direction"):
        check_hypergradient(lambda w: loss(scaled_grad(w, 0.5)), {"w": w}, max_entries=50)


def test_unrolled_inner_loop_by_every_kind_of_input() -> None:
    # 5 steps of SGD with momentum on a least-squares problem; the meta-loss depends on the
    # initial weights, two hyperparameters and the data: all four are checked at once.
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(8, 3, generator=gen)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])

    def meta_loss(
        w0: torch.Tensor, lr: torch.Tensor, momentum: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        w, buf = w0, torch.zeros_like(w0)
        for _ in range(5):
            inner = ((x[:6] @ w - y[:6].to(x.dtype)) ** 2).mean()
            (g,) = torch.autograd.grad(inner, w, create_graph=True)
            buf = momentum * buf + g
            w = w - lr * buf
        return torch.nn.functional.softplus(x[6:] @ w).sum()

    inputs = {
        "w0": torch.randn(3, generator=gen),
        "lr": torch.tensor(0.1),
        "momentum": torch.tensor(0.9),
        "x": data,
        "y": labels,  # integer: passed through, never differentiated
    }
    report = check_hypergradient(meta_loss, inputs, rtol=1e-6, atol=1e-9, max_entries=24)
    assert {e.tensor for e in report.entries} == {"w0", "lr", "momentum", "x"}
    assert len(report.entries) == 3 + 1 + 1 + 24
    only_lr = check_hypergradient(meta_loss, inputs, wrt=["lr"])
    assert [e.where for e in only_lr.entries] == ["lr"]
    assert only_lr.entries[0].autograd == report.entries[3].autograd


def test_inputs_not_checked_still_require_grad() -> None:
    # The inner loop differentiates by w0, so w0 must require grad when only lr is checked.
    def meta_loss(lr: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad((w0**4).sum(), w0, create_graph=True)
        return ((w0 - lr * g) ** 2).sum()

    report = check_hypergradient(
        meta_loss, [torch.tensor(0.01), torch.tensor([0.5, -1.0])], wrt=[0]
    )
    assert [e.where for e in report.entries] == ["inputs[0]"]
    assert report.entries[0].autograd == pytest.approx(-8.175, rel=1e-6)


def test_non_contiguous_inputs_are_indexed_as_they_read() -> None:
    w = torch.arange(6.0).reshape(2, 3).t()  # strides (1, 3): column-major storage
    report = check_hypergradient(lambda w: (w * torch.arange(6.0).reshape(3, 2)).sum(), [w])
    assert [(e.where, e.autograd) for e in report.entries] == [
        (f"inputs[0][{i}, {j}]", float(2 * i + j)) for i in range(3) for j in range(2)
    ]


def test_the_callers_tensors_are_untouched() -> None:
    w = torch.tensor([1.0, 2.0])
    data = torch.tensor([3.0, 4.0], requires_grad=True)
    check_hypergradient(lambda w, d: (w * d).sum(), {"w": w, "d": data})
    assert w.dtype == torch.float32
    assert not w.requires_grad
    assert data.grad is None
    assert w.tolist() == [1.0, 2.0]


def test_unused_inputs_and_non_finite_gradients() -> None:
    report = check_hypergradient(lambda a, b: a.sum() * 2, [torch.ones(2), torch.ones(1)])
    unused = report.entries[-1]
    assert (unused.where, unused.autograd, unused.finite_difference) == ("inputs[1][0]", 0.0, 0.0)
    assert unused.rel_error == 0.0
    # sqrt at 0: autograd says inf, finite differences say something finite
    report = hypergradient_report(lambda w: torch.sqrt(w).sum(), [torch.zeros(1)])
    assert not report.ok
    assert report.failures[0].autograd == float("inf")


def test_report_text() -> None:
    report = check_hypergradient(lambda w: (w**2).sum(), {"w": torch.ones(3)})
    text = str(report)
    assert text.startswith("hypergradient check passed: 3 numbers agree (atol=1e-05, rtol=0.001")
    assert "worst: w[" in text
    many = hypergradient_report(lambda w: scaled_grad(w, 2.0).sum(), {"w": torch.ones(12)})
    lines = many.summary(limit=4).splitlines()
    assert len(lines) == 2 + 4 + 1
    assert lines[-1] == "  ... and 8 more"


@pytest.mark.parametrize(
    ("fn", "inputs", "kwargs", "match"),
    [
        (lambda w: w * 2, [torch.ones(3)], {}, r"scalar tensor .* got shape \(3,\)"),
        (lambda w: 1.0, [torch.ones(3)], {}, "scalar tensor .* got float"),
        (lambda w: w.float().sum(), [torch.ones(3)], {}, "float64 meta-loss, got torch.float32"),
        (lambda w: w.sum(), {"w": torch.ones(1)}, {"wrt": ["v"]}, "wrt names no input: 'v'"),
        (lambda w: w.sum(), [torch.ones(1)], {"wrt": [3]}, "wrt names no input: 3"),
        (
            lambda w, y: w.sum(),
            [torch.ones(1), torch.ones(1, dtype=torch.long)],
            {"wrt": [1]},
            "its dtype torch.int64 is not floating",
        ),
        (lambda y: y.sum(), [torch.ones(1, dtype=torch.long)], {}, "no floating-point input"),
        (lambda w: w.sum(), [[1.0]], {}, "expected a tensor for input inputs.0., got list"),
        (lambda w: w.sum(), torch.ones(1), {}, "sequence or a name -> tensor mapping, got Tensor"),
        (lambda w: w.sum(), [torch.ones(1)], {"eps": 0.0}, "expected eps > 0"),
    ],
)
def test_bad_input_is_a_clear_error(fn: Any, inputs: Any, kwargs: Any, match: str) -> None:
    with pytest.raises(ContribError, match=match) as info:
        hypergradient_report(fn, inputs, **kwargs)
    assert isinstance(info.value, ValueError)
