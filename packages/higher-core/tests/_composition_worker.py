"""The cells of the composition table, run as a user would, and their reference.

    python _composition_worker.py --rank R --world-size W --store FILE --out DIR

`run_cell` takes one meta-gradient of a small float64 network (second-order, SGD with momentum,
a learnable learning rate) over a list of tasks, the way the cell asks for it; `reference` is
the plain full unroll of each task (for `Truncated`: the one that detaches the weights and the
optimizer state at the window's start), written out by hand. As a script (two ranks launched by
test_core_composition.py) it runs every supported distributed cell on this rank's share of the
tasks, averaging with `all_reduce_grads` (sharded) or through a `DistributedDataParallel`
model (DDP), and saves the meta-gradients.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import functools
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.torch_version import TorchVersion

import higher
import higher.distributed
from higher._strategies import SUPPORTED, TABLE, Cell
from higher._unroll.modes import Mode

STEPS = 3
WINDOW = 2
TASKS = 4
MOMENTUM = 0.9
HANG_S = 240  # seconds: the launch has hung (it takes about 5)
BACKEND = "aot_eager"  # dynamo + AOTAutograd: what inductor compiles, in seconds
# the oldest torch each compiled run needs (older ones refuse it, and the eager run is checked)
MIN_TORCH = {"compiled step": "2.3", "compiled meta_step": "2.13"}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def make_tasks() -> list[tuple[Tensor, ...]]:
    """Regression tasks: support (x, y) to adapt on, query (x, y) to score on."""
    g = torch.Generator().manual_seed(7)
    tasks: list[tuple[Tensor, ...]] = []
    for _ in range(TASKS):
        x = torch.randn(6, 3, generator=g, dtype=torch.float64)
        y = torch.sin(x @ torch.randn(3, 1, generator=g, dtype=torch.float64))
        tasks.append((x[:3], y[:3], x[3:], y[3:]))
    return tasks


def mode_of(unroll: str, lr: Tensor) -> Mode:
    modes: dict[str, Mode] = {
        "full": higher.Full(),
        "recompute": higher.Recompute(),
        "truncated": higher.Truncated(window=WINDOW),
        "forward": higher.ForwardMode(wrt=[lr]),
    }
    return modes[unroll]


def inner(model: nn.Module, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    return F.mse_loss(model(xs), ys)


def outer(model: nn.Module, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    return F.mse_loss(model(xq), yq)


per_task_inner = torch.vmap(lambda out, y: F.mse_loss(out, y))


def run_cell(cell: Cell, net: nn.Module, lr: Tensor, tasks: list[tuple[Tensor, ...]]) -> None:
    """Accumulate into `.grad` the mean over `tasks` of the meta-loss's gradient, as `cell`
    computes it (`net` may be a DDP model). The mean is over this list: a rank's share."""
    mode = mode_of(cell.unroll, lr)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=MOMENTUM)
    override = {"lr": [lr]}
    if TABLE[cell] == SUPPORTED and TorchVersion(torch.__version__) < MIN_TORCH.get(
        cell.run, "0.0"
    ):
        cell = _refused_by_this_torch(cell, net, opt, tasks[0])
    n = len(tasks)
    # forward mode differentiates with respect to the learning rate only
    copy = cell.unroll == "forward"
    if cell.run in ("eager loop", "compiled step"):
        compiled = cell.run == "compiled step"
        options = {"backend": BACKEND} if compiled else None
        if cell.tasks == "T tasks":
            xs, ys, xq, yq = (torch.stack(t) for t in zip(*tasks))
            with higher.innerloop_ctx(net, opt, copy_initial_weights=copy, override=override,
                                      unroll=mode, tasks=n, compile=compiled,
                                      compile_options=options) as (fmodel, diffopt):  # fmt: skip
                for _ in range(STEPS):
                    diffopt.step(per_task_inner(fmodel(xs), ys))
                (per_task_inner(fmodel(xq), yq).sum() / n).backward()
            return
        for task in tasks:
            with higher.innerloop_ctx(
                net, opt, copy_initial_weights=copy, override=override, unroll=mode,
                compile=compiled, compile_options=options,
            ) as (fmodel, diffopt):  # fmt: skip
                for _ in range(STEPS):
                    diffopt.step(closure=functools.partial(inner, fmodel, *task))
                (outer(fmodel, *task) / n).backward()
        return
    compiled = cell.run == "compiled meta_step"
    options = {"backend": BACKEND} if compiled else {}
    tasks_arg = n if cell.tasks == "T tasks" else None
    meta = _META.get((cell[:3], n))
    if meta is None:  # made once, as a user would (the compiled graph is reused)
        meta = _META[(cell[:3], n)] = higher.meta_step(inner, outer, steps=STEPS, unroll=mode,
                                                   tasks=tasks_arg, compile=compiled,
                                                   **options)  # fmt: skip
    if tasks_arg is not None:
        batch = tuple(torch.stack(t) for t in zip(*tasks))
        (meta(net, opt, *batch, override=override).sum() / n).backward()
        return
    for task in tasks:
        (meta(net, opt, *task, override=override) / n).backward()


def _refused_by_this_torch(
    cell: Cell, net: nn.Module, opt: torch.optim.Optimizer, task: tuple[Tensor, ...]
) -> Cell:
    """Check that a torch too old to compile the cell's run says so; the eager run instead."""
    want = r"needs torch >= " + re.escape(MIN_TORCH[cell.run])
    if cell.run == "compiled step":
        with (
            higher.innerloop_ctx(net, opt, compile=True) as (fmodel, diffopt),
            pytest.raises(higher.UsageError, match=want),
        ):
            diffopt.step(closure=functools.partial(inner, fmodel, *task))
        return cell._replace(run="eager loop")
    with pytest.raises(higher.FastPathError, match=want):
        higher.meta_step(inner, outer, steps=STEPS, compile=True)
    return cell._replace(run="eager meta_step")


_META: dict[tuple[tuple[str, ...], int], higher.MetaStep] = {}  # shared by the processes


def reference(
    model: nn.Module, lr: Tensor, tasks: list[tuple[Tensor, ...]], truncated: bool
) -> None:
    """The plain per-task full unroll by hand (torch's SGD with momentum): accumulate into
    `.grad` the mean over `tasks` of the meta-loss's gradient. Truncated: the weights and the
    momentum are constants (detached) at the window's start."""
    names = [name for name, _ in model.named_parameters()]
    start = STEPS - WINDOW if truncated else 0
    for xs, ys, xq, yq in tasks:
        params: list[Tensor] = list(model.parameters())
        buffers: list[Tensor] | None = None
        for k in range(STEPS):
            if k == start and truncated:
                params = [p.detach().requires_grad_() for p in params]
                buffers = None if buffers is None else [b.detach() for b in buffers]

            def forward(x: Tensor, ps: list[Tensor] = params) -> Tensor:
                out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
                assert isinstance(out, Tensor)
                return out

            loss = F.mse_loss(forward(xs), ys)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            if buffers is None:
                buffers = list(grads)
            else:
                buffers = [MOMENTUM * b + g for b, g in zip(buffers, grads)]
            params = [p - lr * b for p, b in zip(params, buffers)]
        meta = F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (xq,)), yq)
        (meta / len(tasks)).backward()


def gradients(model: nn.Module, lr: Tensor, unroll: str) -> list[Tensor]:
    """The meta-gradients a cell of `unroll` gives (forward mode: the learning rate's only),
    a missing gradient as zeros."""
    tensors = [lr] if unroll == "forward" else [*model.parameters(), lr]
    return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]


def distributed_cells() -> list[Cell]:
    """The supported cells of the distributed columns."""
    return [c for c, e in TABLE.items() if e == SUPPORTED and c.process != "one process"]


def run_distributed(cell: Cell) -> list[Tensor]:
    """This rank's result of `cell` on its share of the tasks, averaged over the ranks."""
    model = make_model()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    mine = higher.distributed.shard(make_tasks())
    if cell.process == "DDP":
        run_cell(cell, nn.parallel.DistributedDataParallel(model), lr, mine)
    else:
        run_cell(cell, model, lr, mine)
        higher.distributed.all_reduce_grads([*model.parameters(), lr], weight=len(mine))
    return gradients(model, lr, cell.unroll)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True, help="FileStore path (shared by the ranks)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # a hang shows where each rank waits (in its stderr, which the test prints) before the
    # test's own timeout kills it
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(args.store).resolve()}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    results = {tuple(cell): run_distributed(cell) for cell in distributed_cells()}
    torch.save(results, args.out / f"rank{args.rank}.pt")
    # No destroy_process_group: on torch 2.1.2 it hung one launch in ten on a busy machine, both
    # results saved (the collectives had all returned); the process ends here without teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
