"""`cudnn_safe`: double backward through RNNs on the GPU, by keeping only their ops off cuDNN.

cuDNN's RNN kernels have no double backward (`_cudnn_rnn_backward` is not differentiable), so a
meta-gradient through an unrolled LSTM fails on the GPU while it works on the CPU. Without cuDNN,
torch runs RNNs on its own fused cells, whose backward is differentiable. Switching cuDNN off for
a whole program would slow every convolution for nothing, so inside `cudnn_safe` only the RNN ops
(`torch.lstm`, `torch.gru`, `torch.rnn_tanh`, `torch.rnn_relu`) that build a graph on a CUDA
tensor run without it, intercepted by a thread-local `TorchFunctionMode`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_RNN_OP_IDS = frozenset(id(op) for op in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu))

# torch has one process-wide cuDNN switch: a count of the RNN calls (in any thread) now running
# with it off, so the last one to finish, and only it, puts back the value the first one found.
_lock = threading.Lock()
_holders = 0
_restore_to = True
_local = threading.local()  # depth: how deeply this thread is nested in cudnn_safe; mode


def _cudnn_present() -> bool:
    # CUDA builds carry cuDNN on machines without a GPU: nothing to intercept there either.
    return bool(torch.backends.cudnn.is_available()) and torch.cuda.is_available()


def _on_cudnn_device(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


def _tensors(args: Iterable[object]) -> Iterator[torch.Tensor]:
    for arg in args:  # RNN ops take tensors, and lists of tensors (hx, weights), one level deep
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from (a for a in arg if isinstance(a, torch.Tensor))


def _needs_cudnn_off(args: tuple[object, ...]) -> bool:
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return False
    # Without a graph there is nothing to differentiate twice: cuDNN stays on.
    return _on_cudnn_device(args[0]) and any(t.requires_grad for t in _tensors(args))


@contextlib.contextmanager
def _cudnn_switched_off() -> Iterator[None]:
    global _holders, _restore_to
    with _lock:
        if _holders == 0:
            _restore_to = bool(torch.backends.cudnn.enabled)
            torch.backends.cudnn.enabled = False
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                torch.backends.cudnn.enabled = _restore_to


class _RNNsWithoutCudnn(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if id(func) in _RNN_OP_IDS and _needs_cudnn_off(args):
            with _cudnn_switched_off():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class cudnn_safe(contextlib.ContextDecorator):  # lower case: it reads like torch.no_grad
    """Context manager and decorator: RNNs inside it support double backward on the GPU.

    Inside it, each RNN op (`nn.LSTM`, `nn.GRU`, `nn.RNN`, packed sequences too) that builds a
    graph on a CUDA tensor runs without cuDNN; everything else (convolutions, RNNs under
    `torch.no_grad()`) keeps cuDNN. It is a no-op (costs nothing) without cuDNN and a GPU. It nests,
    is safe to enter from many threads at once (it acts on the thread that entered it; torch's
    cuDNN switch is process-wide, so it is off while any such RNN op runs and then restored to
    the value it had), and restores everything when the block raises. Wrap the whole unrolled
    inner loop: the choice of kernel is made in the forward pass, the double backward comes later.

    Examples:
        >>> import torch, higher.contrib
        >>> lstm = torch.nn.LSTM(3, 4)
        >>> with higher.contrib.cudnn_safe():
        ...     out, _ = lstm(torch.ones(5, 1, 3))
        >>> out.shape
        torch.Size([5, 1, 4])

        As a decorator: `@higher.contrib.cudnn_safe()` above a meta-training step.
    """

    def __enter__(self) -> None:
        depth: int = getattr(_local, "depth", 0)
        if depth == 0 and _cudnn_present():
            mode = _RNNsWithoutCudnn()
            mode.__enter__()  # type: ignore[no-untyped-call]
            _local.mode = mode
        _local.depth = depth + 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _local.depth -= 1
        mode: _RNNsWithoutCudnn | None = getattr(_local, "mode", None)
        if _local.depth == 0 and mode is not None:
            _local.mode = None
            mode.__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
