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
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    """What accumulated over the measured loops (after a warm-up); `rss_late`: the resident
    memory's growth over their second half only (a leak grows in both halves; the allocator's
    one-off growth, which a busy machine makes larger, lands in the first)."""

    def __init__(self, tensors: int, rss: int, rss_late: int, cyclic: int,
                 cyclic_tensors: int) -> None:  # fmt: skip
        self.tensors, self.rss, self.rss_late, self.cyclic = tensors, rss, rss_late, cyclic
        self.cyclic_tensors = cyclic_tensors

    def __repr__(self) -> str:
        return (
            f"Growth(tensors={self.tensors}, rss={self.rss / 2**20:.2f} MiB, rss_late="
            f"{self.rss_late / 2**20:.2f} MiB, cyclic={self.cyclic}, "
            f"cyclic_tensors={self.cyclic_tensors})"
        )


def _measure(inner_loop: Callable[[int], None], loops: int, warmup: int) -> Growth:
    with _gc_disabled():
        for i in range(warmup):
            inner_loop(i)
        # what the warm-up left in cycles (one-off: lazy imports and caches of torch and of
        # whatever ran before in this process) is not the measured loops' growth
        gc.collect()
        tensors, rss = _live_tensors(), _rss_bytes()
        half = warmup + loops // 2
        for i in range(warmup, half):
            inner_loop(i)
        rss_half = _rss_bytes()
        for i in range(half, warmup + loops):
            inner_loop(i)
        growth_tensors, rss_end = _live_tensors() - tensors, _rss_bytes()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            cyclic = gc.collect()  # what only the cycle collector could free
            cyclic_tensors = sum(isinstance(obj, torch.Tensor) for obj in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    return Growth(growth_tensors, rss_end - rss, rss_end - rss_half, cyclic, cyclic_tensors)


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
def ten_thousand_inner_loops() -> Growth:
    """What `LOOPS` MAML inner loops of a small model leave behind (run in a process of its own
    by the test below), after checking that their meta-gradients reached the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    growth = _measure(_maml_loop(model, x, y), LOOPS, warmup=200)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    return growth


def test_ten_thousand_inner_loops_leak_nothing() -> None:
    # In a fresh process: what earlier tests of a pytest worker left running or cached (and
    # the collector disabled meanwhile) must not count as this loop's growth.
    here = str(Path(__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_core_leaks as t; "
        "g = t.ten_thousand_inner_loops(); "
        "print(g.tensors, g.rss, g.rss_late, g.cyclic, g.cyclic_tensors)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    growth = Growth(*map(int, done.stdout.split()[-5:]))
    assert growth.tensors <= 5, f"tensors more alive after {LOOPS} inner loops: {growth}"
    assert growth.cyclic <= 50, f"objects in reference cycles after {LOOPS} loops: {growth}"
    assert growth.rss_late < 4 * 2**20, f"resident memory grew in the second half: {growth}"
    assert growth.rss < 16 * 2**20, f"resident memory grew: {growth}"


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


# ---- every memory mode, and batched tasks, with a stateful optimizer --------------------------

MODES: list[Any] = [
    "full",
    "recompute",
    higher.Recompute(every=2),
    higher.Truncated(window=2),
    "forward",
    "batched",
]
TASKS = 2


def _mode_id(mode: Any) -> str:
    return mode if isinstance(mode, str) else repr(mode)


def _small() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """A small MLP, its Adam (a stateful optimizer; made before the collector is disabled: the
    first torch optimizer of a process imports parts of torch, which leaves cycles of its own)
    and one batch per task."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(TASKS, 5, 3, dtype=torch.float64)
    y = torch.randn(TASKS, 5, 1, dtype=torch.float64)
    return model, torch.optim.Adam(model.parameters(), lr=0.05), x, y


class Unrolled:
    """One inner loop of three steps with a learnable learning rate, its meta-loss (`meta`,
    its backward after the block), and weak references to what it made: the functional model,
    the optimizer, the fast weights of the first step and an optimizer state tensor (both
    saved by the next step's graph or node)."""

    def __init__(self, mode: Any, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, backward_inside: bool = False) -> None:  # fmt: skip
        self.lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        override = {"lr": [self.lr]}
        self.refs: dict[str, weakref.ref[Any]] = {}
        if mode == "batched":
            mse = torch.vmap(F.mse_loss)
            with higher.batched_innerloop_ctx(
                model, opt, tasks=TASKS, copy_initial_weights=False, override=override
            ) as (bmodel, bopt):
                for step in range(3):
                    bopt.step(mse(bmodel(x), y))
                    if step == 0:
                        self._keep(bmodel, bopt, bmodel.fast_params[0], bopt.state)
                self.meta = mse(bmodel(x), y).sum()
                if backward_inside:
                    self.meta.backward()
            return
        # forward mode carries derivatives for a few tensors: not for the initial weights
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=mode == "forward", override=override, unroll=mode
        ) as (fmodel, diffopt):
            for step in range(3):
                diffopt.step(closure=_bound(fmodel, x[0], y[0]))
                if step == 0:
                    self._keep(fmodel, diffopt, fmodel.fast_params[0], diffopt.state)
            self.meta = F.mse_loss(fmodel(x[0]), y[0])
            if backward_inside:
                self.meta.backward()

    def _keep(self, fmodel: object, diffopt: object, weight: torch.Tensor, state: Any) -> None:
        self.refs = {
            "fmodel": weakref.ref(fmodel),
            "diffopt": weakref.ref(diffopt),
            "fast weight of step 1": weakref.ref(weight),
            "optimizer state of step 1": weakref.ref(state[0][0]["exp_avg"]),
        }

    def alive(self) -> list[str]:
        return [name for name, ref in self.refs.items() if ref() is not None]


def _bound(
    fmodel: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor]:
    return lambda: F.mse_loss(fmodel(x), y)


def _meta_gradient(model: nn.Module, lr: torch.Tensor) -> list[torch.Tensor]:
    assert lr.grad is not None
    grads = [lr.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_every_mode_is_freed_by_reference_counting(mode: Any) -> None:
    """With the cycle collector off, dropping the meta-loss frees the functional model, the
    optimizer and the tensors the unroll saved, whether the meta-gradient's backward ran inside
    the block, after it (what it needs is reachable from the graph itself), or never."""
    model, opt, x, y = _small()
    with _gc_disabled():
        inside = Unrolled(mode, model, opt, x, y, backward_inside=True)
        reference = _meta_gradient(model, inside.lr)
        del inside.meta
        assert inside.alive() == [], f"{inside.alive()} outlived the inner loop"

        after = Unrolled(mode, model, opt, x, y)
        after.meta.backward()
        got = _meta_gradient(model, after.lr)
        assert len(got) == len(reference) and reference[0].abs() > 0
        for a, b in zip(got, reference):
            assert torch.equal(a, b)
        del after.meta
        assert after.alive() == [], f"{after.alive()} outlived the inner loop"

        unused = Unrolled(mode, model, opt, x, y)
        del unused.meta
        assert unused.alive() == [], f"{unused.alive()} outlived the inner loop"


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_fifty_inner_loops_in_every_mode_leak_nothing(mode: Any) -> None:
    model, opt, x, y = _small()

    def inner_loop(i: int) -> None:
        unrolled = Unrolled(mode, model, opt, x, y)
        if i % 2:
            unrolled.meta.backward()
        del unrolled.meta
        model.zero_grad()

    growth = _measure(inner_loop, 50, warmup=5)
    assert growth.tensors <= 5, f"{growth.tensors} tensors more alive after 50 inner loops"
    assert growth.cyclic_tensors == 0, f"{growth.cyclic_tensors} tensors in reference cycles"
    if mode != "batched":  # torch.func.vmap leaves small cycles of its own (no tensors)
        assert growth.cyclic <= 50, f"{growth.cyclic} objects in reference cycles"
    assert growth.rss < 8 * 2**20, f"resident memory grew {growth.rss / 2**20:.1f} MiB"
