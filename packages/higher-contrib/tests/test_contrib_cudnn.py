"""`cudnn_safe`: what it switches, when, for how long, and that it always puts things back.

This machine has no cuDNN, so most tests make it act as if it had: RNN ops on CPU tensors count
as cuDNN ones (`cudnn_forced`). torch's cuDNN switch itself is real on every build; a recording
mode pushed below `cudnn_safe`'s sees its value at the moment each RNN op runs.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

import higher.contrib
from higher.contrib import _cudnn, cudnn_safe

RNN_OPS = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


class SwitchAtRNNOps(TorchFunctionMode):
    """Records torch's cuDNN switch before and after each RNN op runs (and can make it fail)."""

    def __init__(self, fail: bool = False, pause: float = 0.0) -> None:
        super().__init__()
        self.seen: list[tuple[str, bool, bool]] = []
        self.fail = fail
        self.pause = pause

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if not any(func is op for op in RNN_OPS):
            return func(*args, **(kwargs or {}))
        before = bool(torch.backends.cudnn.enabled)
        if self.fail:
            raise RuntimeError("an RNN kernel failed")
        time.sleep(self.pause)  # widens the window in which another thread could flip the switch
        out = func(*args, **(kwargs or {}))
        self.seen.append((func.__name__, before, bool(torch.backends.cudnn.enabled)))
        return out


@pytest.fixture(autouse=True)
def _switch_restored() -> Iterator[None]:
    before = torch.backends.cudnn.enabled
    yield
    torch.backends.cudnn.enabled = before
    assert _cudnn._holders == 0
    assert getattr(_cudnn._local, "depth", 0) == 0


@pytest.fixture
def cudnn_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Act as a machine with cuDNN where every tensor lives on a cuDNN device."""
    monkeypatch.setattr(_cudnn, "_cudnn_present", lambda: True)
    monkeypatch.setattr(_cudnn, "_on_cudnn_device", lambda tensor: True)


def run_rnns(x: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    outs = [m(x)[0] for m in (torch.nn.LSTM(3, 4), torch.nn.GRU(3, 4), torch.nn.RNN(3, 4))]
    outs.append(torch.nn.RNN(3, 4, nonlinearity="relu")(x)[0])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    outs.append(torch.nn.LSTM(3, 4)(packed)[0].data)
    return outs


X = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1))


def test_cpu_tensors_are_left_alone() -> None:
    # No forcing: CPU tensors never meet cuDNN, so nothing is switched on any build.
    reference = run_rnns(X)
    with SwitchAtRNNOps() as rec, cudnn_safe():
        outs = run_rnns(X)
    assert [s[1:] for s in rec.seen] == [(True, True)] * 5
    for out, ref in zip(outs, reference):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.usefixtures("cudnn_forced")
def test_only_rnn_ops_run_without_cudnn_and_only_while_they_run() -> None:
    with SwitchAtRNNOps() as rec, cudnn_safe():
        run_rnns(X)
        between_ops = torch.backends.cudnn.enabled
    assert rec.seen == [
        ("lstm", False, False),
        ("gru", False, False),
        ("rnn_tanh", False, False),
        ("rnn_relu", False, False),
        ("lstm", False, False),
    ]
    assert between_ops is True
    assert torch.backends.cudnn.enabled is True


@pytest.mark.usefixtures("cudnn_forced")
def test_rnn_ops_without_a_graph_keep_cudnn() -> None:
    lstm = torch.nn.LSTM(3, 4)
    with SwitchAtRNNOps() as rec, cudnn_safe():
        with torch.no_grad():
            lstm(X)
        lstm.requires_grad_(False)
        lstm(X)  # grad mode on, but nothing requires grad: no graph either
        lstm(X.requires_grad_())  # the input requires grad: a graph
    assert [s[1] for s in rec.seen] == [True, True, False]


@pytest.mark.usefixtures("cudnn_forced")
def test_a_switched_off_cudnn_stays_off() -> None:
    torch.backends.cudnn.enabled = False
    with SwitchAtRNNOps() as rec, cudnn_safe():
        run_rnns(X)
    assert {s[1] for s in rec.seen} == {False}
    assert torch.backends.cudnn.enabled is False


@pytest.mark.usefixtures("cudnn_forced")
def test_nesting() -> None:
    lstm = torch.nn.LSTM(3, 4)
    with SwitchAtRNNOps() as rec:
        with cudnn_safe():
            with cudnn_safe():
                lstm(X)
            lstm(X)  # the inner exit must not end the outer block
        lstm(X)  # outside: untouched
    assert [s[1] for s in rec.seen] == [False, False, True]
    assert torch.backends.cudnn.enabled is True


@pytest.mark.usefixtures("cudnn_forced")
def test_a_failing_rnn_op_restores_the_switch() -> None:
    lstm = torch.nn.LSTM(3, 4)
    with SwitchAtRNNOps(fail=True), cudnn_safe(), pytest.raises(RuntimeError, match="failed"):
        lstm(X)
    assert torch.backends.cudnn.enabled is True
    with SwitchAtRNNOps() as rec:
        lstm(X)
    assert [s[1] for s in rec.seen] == [True]


@pytest.mark.usefixtures("cudnn_forced")
def test_an_exception_in_the_block_ends_it() -> None:
    lstm = torch.nn.LSTM(3, 4)

    def body() -> None:
        with cudnn_safe():
            lstm(X)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        body()
    with SwitchAtRNNOps() as rec:
        lstm(X)
    assert [s[1] for s in rec.seen] == [True]
    assert getattr(_cudnn._local, "depth", 0) == 0


@pytest.mark.usefixtures("cudnn_forced")
def test_as_a_decorator() -> None:
    gru = torch.nn.GRU(3, 4)

    @cudnn_safe()
    def step(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = gru(x)[0].sum()
        return out

    @cudnn_safe()
    def failing(x: torch.Tensor) -> None:
        gru(x)
        raise ValueError("inside")

    with SwitchAtRNNOps() as rec:
        value = step(X)
        with pytest.raises(ValueError, match="inside"):
            failing(X)
        gru(X)
    torch.testing.assert_close(value, gru(X)[0].sum())
    assert [s[1] for s in rec.seen] == [False, False, True]
    assert step.__name__ == "step"


@pytest.mark.usefixtures("cudnn_forced")
def test_threads_share_one_switch_safely() -> None:
    # Each thread holds cuDNN off only while its own RNN ops run; overlapping ops in other
    # threads must never see the switch flipped back under them.
    n_threads, rounds = 4, 15
    barrier = threading.Barrier(n_threads)
    seen: list[list[tuple[str, bool, bool]]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []
    shared = cudnn_safe()  # one instance, entered from every thread at once

    def work(k: int) -> None:
        try:
            gru = torch.nn.GRU(3, 4)
            barrier.wait()
            with SwitchAtRNNOps(pause=0.001) as rec:
                for _ in range(rounds):
                    with shared:
                        gru(X)
                        with cudnn_safe():
                            gru(X)
            seen[k] = rec.seen
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(len(s) == 2 * rounds for s in seen)
    assert {(before, after) for s in seen for _, before, after in s} == {(False, False)}
    assert torch.backends.cudnn.enabled is True


@pytest.mark.usefixtures("cudnn_forced")
def test_other_threads_are_not_intercepted() -> None:
    lstm = torch.nn.LSTM(3, 4)
    seen: list[tuple[str, bool, bool]] = []

    def elsewhere() -> None:
        with SwitchAtRNNOps() as rec:
            lstm(X)
        seen.extend(rec.seen)

    with cudnn_safe():
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert [s[1] for s in seen] == [True]


def lstm_meta_loss(
    model: torch.nn.LSTM, context: AbstractContextManager[Any]
) -> Callable[..., torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]

    def meta_loss(lr: torch.Tensor, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, weights))
        with context:  # one inner SGD step, then the loss of the stepped weights
            inner = functional_call(model, params, (x[:3],))[0].pow(2).mean()
            grads = torch.autograd.grad(inner, weights, create_graph=True)
            fast = {n: w - lr * g for n, w, g in zip(names, weights, grads)}
            outer: torch.Tensor = functional_call(model, fast, (x[3:],))[0].tanh().sum()
            return outer

    return meta_loss


@pytest.mark.usefixtures("cudnn_forced")
def test_lstm_meta_gradient_matches_finite_differences_inside() -> None:
    torch.manual_seed(0)
    model = torch.nn.LSTM(3, 2).double()
    inputs = [torch.tensor(0.5), torch.randn(6, 1, 3), *(p.detach() for p in model.parameters())]
    with SwitchAtRNNOps() as rec:
        report = higher.contrib.check_hypergradient(
            lstm_meta_loss(model, cudnn_safe()), inputs, rtol=1e-5, max_entries=8
        )
    assert report.ok
    # lr, x (18 entries: 3 random directions) and the 4 weight tensors, each checked
    assert {e.tensor for e in report.entries} == {f"inputs[{i}]" for i in range(6)}
    assert rec.seen
    assert {s[1] for s in rec.seen} == {False}


@pytest.mark.cuda
def test_lstm_meta_gradient_on_the_gpu() -> None:
    torch.manual_seed(0)
    model = torch.nn.LSTM(4, 8, num_layers=2).double()
    x = torch.randn(7, 2, 4, dtype=torch.float64)
    weights = [p.detach().clone() for p in model.parameters()]

    def meta_grads(device: str, context: AbstractContextManager[Any]) -> list[torch.Tensor]:
        moved = model.to(device)
        leaves = [w.detach().to(device, copy=True).requires_grad_() for w in weights]
        lr = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
        loss = lstm_meta_loss(moved, context)(lr, x.to(device), *leaves)
        return [g.cpu() for g in torch.autograd.grad(loss, [lr, *leaves])]

    reference = meta_grads("cpu", nullcontext())
    assert torch.backends.cudnn.is_available()
    on_gpu = meta_grads("cuda", cudnn_safe())
    for got, want in zip(on_gpu, reference):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.backends.cudnn.enabled is True

    # Without it, torch's cuDNN RNN has no double backward (where a future torch adds one, the
    # result must agree all the same).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        failure = ""
        try:
            plain = meta_grads("cuda", nullcontext())
        except RuntimeError as err:
            failure = str(err)
        if failure:
            assert re.search("cudnn", failure, re.IGNORECASE), failure
        else:
            for got, want in zip(plain, reference):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
