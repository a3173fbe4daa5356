"""The memory modes give the meta-gradients of a plain unroll (float64, rtol 1e-8): for
SGD with momentum, Adam and RMSprop; with respect to the initial weights (MAML), a learned
learning rate, per-parameter learning rates (Meta-SGD) and the data; through BatchNorm,
dropout and an LSTM; and to third order. Truncated unrolls equal a hand-written truncation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import higher

T = torch.Tensor
DT = torch.float64
STEPS = 6

RECOMPUTE = [higher.Recompute(), higher.Recompute(every=4)]
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
}


def mse(model: Callable[[T], T], x: T, y: T) -> Callable[[], T]:
    """The closure of a step on (x, y): its arguments bind the batch (a lambda in a loop would
    read the loop's variables when it is called again)."""
    return lambda: F.mse_loss(model(x), y)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DT)


def batches(n: int = STEPS, shape: tuple[int, ...] = (5, 4)) -> list[tuple[T, T]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(*shape, generator=g, dtype=DT),
            torch.randn(shape[0], 1, generator=g, dtype=DT),
        )
        for _ in range(n)
    ]


def assert_close(got: Sequence[T | None], ref: Sequence[T | None]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def meta_gradient(
    unroll: Any,
    target: str,
    opt_name: str = "adam",
    *,
    order: int = 2,
) -> list[T | None]:
    """The meta-gradient of a 6-step unroll of an MLP for one kind of target (full mode's are
    computed once: they are every exact mode's reference)."""
    if unroll == "full":
        return _full(target, opt_name, order)
    return _meta_gradient(unroll, target, opt_name, order=order)


@functools.cache
def _full(target: str, opt_name: str, order: int) -> list[T | None]:
    return _meta_gradient("full", target, opt_name, order=order)


def _meta_gradient(
    unroll: Any,
    target: str,
    opt_name: str = "adam",
    *,
    order: int = 2,
) -> list[T | None]:
    model = mlp()
    data = batches()
    xq, yq = batches(1, (7, 4))[0]
    opt = OPTIMIZERS[opt_name](model.parameters())
    base_lr = opt.param_groups[0]["lr"]
    override: dict[str, list[Any]] | None = None
    wrt: list[T]
    x_learned = data[0][0].clone().requires_grad_()
    if target == "maml":
        wrt = list(model.parameters())
    elif target == "lr":
        wrt = [torch.tensor(base_lr, dtype=DT, requires_grad=True)]
        override = {"lr": wrt}
    elif target == "meta-sgd":
        wrt = [torch.full_like(p, base_lr).requires_grad_() for p in model.parameters()]
        override = {"lr": [wrt]}
    else:  # data: the first batch's inputs, used by every step
        wrt = [x_learned]
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=target != "maml", override=override, unroll=unroll
    ) as (fmodel, diffopt):
        for t, (x, y) in enumerate(data):
            if target == "data":
                x = x_learned * (1 + 0.1 * t)
            diffopt.step(closure=mse(fmodel, x, y))
        meta = F.mse_loss(fmodel(xq), yq)
    grads = torch.autograd.grad(meta, wrt, create_graph=order > 2, allow_unused=True)
    if order == 2:
        return list(grads)
    total = sum((g.square().sum() for g in grads if g is not None), torch.zeros((), dtype=DT))
    return list(torch.autograd.grad(total, wrt, allow_unused=True))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("target", ["maml", "lr", "meta-sgd", "data"])
@pytest.mark.parametrize("mode", RECOMPUTE, ids=repr)
def test_recompute_equals_full(mode: Any, target: str, opt_name: str) -> None:
    assert_close(meta_gradient(mode, target, opt_name), meta_gradient("full", target, opt_name))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("target", ["lr", "meta-sgd"])
def test_forward_mode_equals_full(target: str, opt_name: str) -> None:
    assert_close(
        meta_gradient("forward", target, opt_name), meta_gradient("full", target, opt_name)
    )


def test_forward_mode_for_data_named_in_wrt() -> None:
    # the data is no hyperparameter: name it (20 elements, 20 directions)
    ref = meta_gradient("full", "data")
    got = _forward_data()
    assert_close(got, ref)


def _forward_data() -> list[T | None]:
    model = mlp()
    data = batches()
    xq, yq = batches(1, (7, 4))[0]
    x_learned = data[0][0].clone().requires_grad_()
    opt = OPTIMIZERS["adam"](model.parameters())
    mode = higher.ForwardMode(wrt=[x_learned])
    with higher.innerloop_ctx(model, opt, unroll=mode) as (fmodel, diffopt):
        for t, (_, y) in enumerate(data):
            diffopt.step(F.mse_loss(fmodel(x_learned * (1 + 0.1 * t)), y))  # a plain loss
        meta = F.mse_loss(fmodel(xq), yq)
    return list(torch.autograd.grad(meta, [x_learned]))


@pytest.mark.parametrize("target", ["maml", "lr", "data"])
@pytest.mark.parametrize("mode", RECOMPUTE, ids=repr)
def test_third_order_equals_full(mode: Any, target: str) -> None:
    """The gradient of the meta-gradient's squared norm."""
    ref = meta_gradient("full", target, "sgd-momentum", order=3)
    assert_close(meta_gradient(mode, target, "sgd-momentum", order=3), ref)


# ---- layers with state or randomness -----------------------------------------------------------


def _layered(kind: str, unroll: Any, seed: int = 3) -> tuple[list[T | None], list[T]]:
    """Meta-gradient (initial weights and lr) and the buffers after the backward pass."""
    torch.manual_seed(0)
    if kind == "lstm":
        model: torch.nn.Module = _LSTMHead()
        shape: tuple[int, ...] = (4, 3, 3)  # (sequence, batch, features) -> (3, 1)
    else:
        layers: list[torch.nn.Module] = [torch.nn.Linear(4, 8)]
        if kind.startswith("batchnorm"):
            layers.append(torch.nn.BatchNorm1d(8, momentum=0.3))
        if kind == "dropout":
            layers.append(torch.nn.Dropout(0.3))
        model = torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(8, 1))
        shape = (6, 4)
    model = model.to(DT)
    if kind == "batchnorm-eval":
        model[1].running_mean.uniform_(-0.5, 0.5)  # type: ignore[index]
        model.eval()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(*shape, generator=g, dtype=DT) for _ in range(STEPS + 1)]
    target = torch.randn(3 if kind == "lstm" else 6, 1, generator=g, dtype=DT)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    torch.manual_seed(seed)  # the dropout masks
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, override={"lr": [lr]}, unroll=unroll
    ) as (fmodel, diffopt):
        for x in data[:-1]:
            diffopt.step(closure=mse(fmodel, x, target))
        if kind == "dropout":
            fmodel.eval()  # the meta-loss without dropout: the steps are rebuilt in train mode
        meta = F.mse_loss(fmodel(data[-1]), target)
        grads = torch.autograd.grad(meta, [lr, *model.parameters()])
        buffers = [b.clone() for b in fmodel.buffers()]
    return list(grads), buffers


class _LSTMHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 5)
        self.head = torch.nn.Linear(5, 1)

    def forward(self, x: T) -> T:
        out, _ = self.lstm(x)
        return self.head(out[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["batchnorm", "batchnorm-eval", "dropout", "lstm"])
@pytest.mark.parametrize("mode", RECOMPUTE, ids=repr)
def test_layers_equal_full(mode: Any, kind: str) -> None:
    got, got_buffers = _layered(kind, mode)
    ref, ref_buffers = _layered(kind, "full")
    assert_close(got, ref)
    # running statistics moved once per step, as in the plain unroll (not again when rebuilt)
    assert len(got_buffers) == len(ref_buffers)
    for a, b in zip(got_buffers, ref_buffers):
        assert torch.equal(a, b)


def test_dropout_masks_matter() -> None:
    """The dropout test can fail: other masks give another meta-gradient."""
    ref, _ = _layered("dropout", "full")
    other, _ = _layered("dropout", "full", seed=4)
    assert ref[0] is not None and other[0] is not None
    assert not torch.allclose(ref[0], other[0])


# ---- truncation ----------------------------------------------------------------------------------


def _truncated(window: int, *, by_hand: bool, order: int = 2) -> list[T]:
    model = mlp()
    data = batches()
    xq, yq = batches(1, (7, 4))[0]
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    x_learned = data[0][0].clone().requires_grad_()
    inputs = [x_learned * (1 + 0.1 * t) for t in range(STEPS)]
    if by_hand:  # SGD with momentum, written out; the graph starts `window` steps from the end
        names = [n for n, _ in model.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        bufs: list[T] | None = None
        for t, ((_, y), x) in enumerate(zip(data, inputs)):
            if t == STEPS - window:
                params = [p.detach().requires_grad_() for p in params]
                bufs = None if bufs is None else [b.detach() for b in bufs]
            out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
            grads = torch.autograd.grad(F.mse_loss(out, y), params, create_graph=True)
            bufs = list(grads) if bufs is None else [0.9 * b + g for b, g in zip(bufs, grads)]
            params = [p - lr * b for p, b in zip(params, bufs)]
        meta = F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (xq,)), yq)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        mode = higher.Truncated(window=window)
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}, unroll=mode) as (
            fmodel,
            diffopt,
        ):
            for (_, y), x in zip(data, inputs):
                diffopt.step(closure=mse(fmodel, x, y))
            meta = F.mse_loss(fmodel(xq), yq)
    grads = torch.autograd.grad(meta, [lr, x_learned], create_graph=order > 2)
    if order == 2:
        return list(grads)
    return list(torch.autograd.grad(grads[0] + grads[1].sum(), [lr, x_learned]))


@pytest.mark.parametrize("window", [1, 3, STEPS])
def test_truncated_equals_hand_written_truncation(window: int) -> None:
    got, ref = _truncated(window, by_hand=False), _truncated(window, by_hand=True)
    assert_close(list(got), list(ref))


def test_truncated_third_order_and_full_window() -> None:
    assert_close(_truncated(2, by_hand=False, order=3), _truncated(2, by_hand=True, order=3))
    # a window as long as the unroll is the exact meta-gradient
    full = meta_gradient("full", "lr", "sgd-momentum")
    assert not torch.allclose(_truncated(2, by_hand=False)[0], _truncated(STEPS, by_hand=False)[0])
    assert full[0] is not None


def test_losses_along_the_trajectory() -> None:
    """A meta-loss that sums the loss after every step (each step's weights get gradients
    from several places)."""

    def run(unroll: Any) -> list[T | None]:
        model = mlp()
        lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        data = batches()
        total = torch.zeros((), dtype=DT)
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, override={"lr": [lr]}, unroll=unroll
        ) as (fmodel, diffopt):
            for x, y in data:
                diffopt.step(closure=mse(fmodel, x, y))
                total = total + F.mse_loss(fmodel(data[0][0]), data[0][1])
        return list(torch.autograd.grad(total, [lr, *model.parameters()]))

    ref = run("full")
    for mode in RECOMPUTE:
        assert_close(run(mode), ref)


class _Partly(torch.nn.Module):
    """A frozen layer, a layer the loss never uses, and two param groups."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(4, 8)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(8, 1)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x: T) -> T:
        return self.head(torch.tanh(self.frozen(x)))  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", [*RECOMPUTE, "forward"], ids=repr)
def test_frozen_unused_and_grouped_parameters(mode: Any) -> None:
    def run(unroll: Any) -> list[T | None]:
        torch.manual_seed(0)
        model = _Partly().to(DT)
        groups: list[dict[str, Any]] = [
            {"params": [*model.frozen.parameters(), *model.unused.parameters()]},
            {"params": list(model.head.parameters()), "lr": 0.02},
        ]
        opt = torch.optim.Adam(groups, lr=0.05)
        lrs = [torch.tensor(0.05, dtype=DT, requires_grad=True) for _ in range(2)]
        with higher.innerloop_ctx(model, opt, override={"lr": lrs}, unroll=unroll) as (
            fmodel,
            diffopt,
        ):
            for x, y in batches():
                diffopt.step(closure=mse(fmodel, x, y))
            meta = F.mse_loss(fmodel(batches(1, (7, 4))[0][0]), batches(1, (7, 4))[0][1])
            unused = list(fmodel.parameters())[-2:]
            assert all(torch.equal(a, b) for a, b in zip(unused, model.unused.parameters()))
        return list(torch.autograd.grad(meta, lrs, allow_unused=True))

    got, ref = run(mode), run("full")
    assert ref[0] is None and ref[1] is not None  # group 0 steps nothing the loss uses
    assert got[0] is None
    assert_close(got[1:], ref[1:])


# ---- grad_callbacks, and losses that become NaN or infinite ------------------------------------

EXACT_MODES: list[Any] = [*RECOMPUTE, higher.Truncated(window=STEPS), "forward"]


def _callback_unroll(
    unroll: Any,
    callback: Callable[[list[T | None]], list[T | None]] | None = None,
    spoil: Callable[[int, T], T] | None = None,
    dtype: torch.dtype = DT,
) -> list[T]:
    """The meta-gradient (learning rate, and initial weights where the mode gives them) of a
    6-step Adam unroll whose steps use `callback` and whose step `t`'s loss is
    `spoil(t, loss)`."""
    model = mlp().to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    lr = torch.tensor(0.05, dtype=dtype, requires_grad=True)
    maml = unroll != "forward"  # forward mode carries derivatives for a few tensors only
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=not maml, override={"lr": [lr]}, unroll=unroll
    ) as (fmodel, diffopt):
        for t, (x, y) in enumerate(batches()):
            x, y = x.to(dtype), y.to(dtype)

            def loss(x: T = x, y: T = y, t: int = t) -> T:
                value = F.mse_loss(fmodel(x), y)
                return value if spoil is None else spoil(t, value)

            diffopt.step(closure=loss, grad_callback=callback)
        meta = F.mse_loss(
            fmodel(batches(1, (7, 4))[0][0].to(dtype)), torch.zeros(7, 1, dtype=dtype)
        )
    wrt = [lr, *model.parameters()] if maml else [lr]
    return list(torch.autograd.grad(meta, wrt))


def _counting_clip() -> Callable[[list[T | None]], list[T | None]]:
    """A clipping schedule that counts its calls: pure only where each step calls it once."""
    calls = [0]

    def callback(grads: list[T | None]) -> list[T | None]:
        calls[0] += 1
        return higher.optim.clip_grad_norm(1.0 / calls[0])(grads)

    return callback


def _torch_noise(grads: list[T | None]) -> list[T | None]:
    """Pure as a rebuilt step sees it: torch's random-number state is restored for it."""
    return [None if g is None else g * (1 + 0.1 * torch.randn(())) for g in grads]


@pytest.mark.parametrize("callback", ["clip", "torch-noise"])
@pytest.mark.parametrize("mode", EXACT_MODES, ids=repr)
def test_a_pure_grad_callback_gives_full_modes_meta_gradient(mode: Any, callback: str) -> None:
    pure = higher.optim.clip_grad_norm(0.5) if callback == "clip" else _torch_noise
    torch.manual_seed(3)
    got = _callback_unroll(mode, pure)
    torch.manual_seed(3)
    ref = _callback_unroll("full", pure)
    assert_close(got, ref[: len(got)])


def test_a_pure_grad_callback_passes_the_check_in_float32() -> None:
    """Round-off of the rebuilt gradients (float32) is not mistaken for an impure callback."""
    clip = higher.optim.clip_grad_norm(0.5)
    got = _callback_unroll("recompute", clip, dtype=torch.float32)
    ref = _callback_unroll("full", clip, dtype=torch.float32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_forward_mode_runs_a_grad_callback_once_per_step() -> None:
    """Forward mode never runs a step again: a callback with a step counter is fine there."""
    assert_close(_callback_unroll("forward", _counting_clip()),
                 _callback_unroll("full", _counting_clip())[:1])  # fmt: skip


SPOILS: dict[str, Callable[[int, T], T]] = {
    # the loss is NaN, its gradient finite: full mode's meta-gradient is finite
    "nan-constant": lambda t, loss: loss + torch.tensor(float("nan"), dtype=loss.dtype),
    "inf-constant": lambda t, loss: loss + torch.tensor(float("inf"), dtype=loss.dtype),
    # from step 2 on, the loss (so the weights and the meta-gradient) is NaN
    "nan-from-step-2": lambda t, loss: loss * float("nan") if t == 2 else loss,
    "inf-at-step-2": lambda t, loss: loss * float("inf") if t == 2 else loss,
}


@pytest.mark.parametrize("spoil", list(SPOILS))
@pytest.mark.parametrize("mode", EXACT_MODES, ids=repr)
def test_nan_and_inf_losses_give_full_modes_meta_gradient(mode: Any, spoil: str) -> None:
    got, ref = (
        _callback_unroll(mode, spoil=SPOILS[spoil]),
        _callback_unroll("full", spoil=SPOILS[spoil]),
    )
    assert len(got) <= len(ref)
    finite = spoil.endswith("constant")
    for a, b in zip(got, ref):
        assert bool(b.isfinite().all()) == finite  # what full mode gives, NaN or not
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, equal_nan=True)
