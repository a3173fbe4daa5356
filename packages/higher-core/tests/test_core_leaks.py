"""Nothing leaks across inner loops: refcounting alone frees an inner loop when its `with` ends.

The cyclic garbage collector is disabled while the loops run, so anything kept alive by a
reference cycle (or by a cache) accumulates and shows in the live tensor count, the objects
`gc.collect()` finds afterwards, and the resident memory. `HIGHER_LEAK_LOOPS` sets the number of
inner loops of the small-model run (default 10,000).
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher

LOOPS = int(os.environ.get("HIGHER_LEAK_LOOPS", "10000"))


def _rss_bytes() -> int:
    """Resident memory now (Linux), or the peak so far elsewhere: flat either way if no leak."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@contextmanager
def _gc_disabled() -> Iterator[None]:
    gc.collect()
    was, threads = gc.isenabled(), torch.get_num_threads()
    gc.disable()
    torch.set_num_threads(1)  # tiny ops: a thread pool only adds waiting on a shared machine
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if was:
            gc.enable()


class Growth:
    """What accumulated over the measured loops (after a warm-up)."""

    def __init__(self, tensors: int, rss: int, cyclic: int) -> None:
        self.tensors, self.rss, self.cyclic = tensors, rss, cyclic


def _measure(inner_loop: Callable[[int], None], loops: int, warmup: int) -> Growth:
    with _gc_disabled():
        for i in range(warmup):
            inner_loop(i)
        tensors, rss = _live_tensors(), _rss_bytes()
        for i in range(warmup, warmup + loops):
            inner_loop(i)
        growth_tensors, growth_rss = _live_tensors() - tensors, _rss_bytes() - rss
        cyclic = gc.collect()  # what only the cycle collector could free
    return Growth(growth_tensors, growth_rss, cyclic)


def _maml_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[int], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    alive: list[weakref.ref[nn.Module]] = []

    def inner_loop(i: int) -> None:
        # The functional models of earlier calls (whose frames have ended) must be gone.
        assert all(ref() is None for ref in alive), "an inner loop's fmodel outlived its block"
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(_first(fmodel(x)), y))
            F.mse_loss(_first(fmodel(x)), y).backward()
            if i % 10 == 0:
                alive.append(weakref.ref(fmodel))

    return inner_loop


def _first(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.slow
def test_ten_thousand_inner_loops_leak_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    growth = _measure(_maml_loop(model, x, y), LOOPS, warmup=200)
    assert growth.tensors <= 5, f"{growth.tensors} tensors more alive after {LOOPS} inner loops"
    assert growth.cyclic <= 50, f"{growth.cyclic} objects in reference cycles after {LOOPS} loops"
    assert growth.rss < 8 * 2**20, f"resident memory grew {growth.rss / 2**20:.1f} MiB"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inner_loops_over_a_recurrent_model_leak_nothing(cell: str) -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(2, 3, num_layers=2) if cell == "lstm" else nn.GRU(2, 3, bidirectional=True)
    x = torch.randn(3, 2, 2)
    y = torch.randn(3, 2, 6 if cell == "gru" else 3)
    growth = _measure(_maml_loop(rnn, x, y), 100, warmup=20)
    assert growth.tensors <= 5, f"{growth.tensors} tensors more alive after 100 inner loops"
    assert growth.cyclic <= 50, f"{growth.cyclic} objects in reference cycles after 100 loops"
    assert growth.rss < 8 * 2**20, f"resident memory grew {growth.rss / 2**20:.1f} MiB"
