"""One rank of the distributed tests (test_core_distributed.py launches two), and the scenarios.

    python _distributed_worker.py --rank R --world-size W --store FILE --out DIR --group NAME

Every scenario meta-trains a small float64 network for 3 outer steps (second-order MAML, 2 SGD
steps per task, SGD with momentum as the meta-optimizer: a gradient off by any factor shows)
and returns its final meta-parameters. Run without a process group (`rank=0, world=1`), the
same function is the single process that runs every task: the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import higher
import higher.distributed

CPU = torch.device("cpu")
OUTER_STEPS = 3
INNER_STEPS = 2


class Scenario(NamedTuple):
    """What one equality test varies."""

    tasks: int  # per meta-batch
    ddp: bool = False  # innerloop_ctx(DistributedDataParallel(model), ...)
    learnable_lr: bool = False  # the inner lr is an override tensor the meta-optimizer trains
    batches: int = 1  # meta-batches accumulated before each outer step
    summed: bool = False  # one backward of the summed losses (after the inner loops closed)
    first_order: bool = False  # track_higher_grads=False
    weighted: bool = True  # all_reduce_grads(weight=number of tasks of the rank), else 1


SCENARIOS = {
    "even": Scenario(tasks=4),
    "uneven": Scenario(tasks=5),
    "learnable_lr": Scenario(tasks=5, learnable_lr=True),
    "accumulate": Scenario(tasks=3, batches=2),
    "fewer_tasks_than_ranks": Scenario(tasks=1),
    "ddp": Scenario(tasks=4, ddp=True),
    "ddp_uneven": Scenario(tasks=5, ddp=True),
    "ddp_learnable_lr": Scenario(tasks=3, ddp=True, learnable_lr=True),
    "ddp_accumulate": Scenario(tasks=3, ddp=True, batches=2),
    "ddp_summed": Scenario(tasks=5, ddp=True, summed=True),
    "ddp_first_order": Scenario(tasks=3, ddp=True, first_order=True),
    # The negative control: the plain mean over ranks of uneven shares is not the reference.
    "uneven_unweighted": Scenario(tasks=5, weighted=False),
}
GROUPS = {"equality": list(SCENARIOS)}


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double().to(device)


def make_task(step: int, index: int, device: torch.device) -> tuple[Tensor, ...]:
    """A regression task: support (x, y) to adapt on, query (x, y) to score on."""
    g = torch.Generator().manual_seed(1000 * step + index)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = x @ torch.randn(3, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        8, 1, generator=g, dtype=torch.float64
    )
    x, y = x.to(device), y.to(device)
    return x[:4], y[:4], x[4:], y[4:]


def train(scenario: Scenario, device: torch.device = CPU) -> list[Tensor]:
    """Meta-train; return the final meta-parameters (weights, then the lr if learnable)."""
    model = make_model(device)
    distributed = dist.is_initialized()
    ddp = None
    if scenario.ddp and distributed:
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    net = model if ddp is None else ddp
    lr = torch.tensor(0.1, dtype=torch.float64, device=device, requires_grad=True)
    meta_params = list(model.parameters()) + ([lr] if scenario.learnable_lr else [])
    meta_opt = torch.optim.SGD(meta_params, lr=0.1, momentum=0.9)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    override = {"lr": [lr]} if scenario.learnable_lr else None
    for step in range(OUTER_STEPS):
        meta_opt.zero_grad()
        batches = [
            [make_task(step, b * scenario.tasks + i, device) for i in range(scenario.tasks)]
            for b in range(scenario.batches)
        ]
        mine = [t for batch in batches for t in higher.distributed.shard(batch)]
        losses = []
        for k, (xs, ys, xq, yq) in enumerate(mine):
            last = k == len(mine) - 1
            accumulate = ddp.no_sync() if ddp is not None and not last else None
            with (
                accumulate or contextlib.nullcontext(),
                higher.innerloop_ctx(
                    net,
                    inner_opt,
                    copy_initial_weights=False,
                    override=override,
                    track_higher_grads=not scenario.first_order,
                ) as (fmodel, diffopt),
            ):
                for _ in range(INNER_STEPS):
                    diffopt.step(F.mse_loss(fmodel(xs), ys))
                # Each task's loss over this rank's task count: the mean over its share.
                loss = F.mse_loss(fmodel(xq), yq) / len(mine)
                if scenario.summed:
                    losses.append(loss)
                else:
                    loss.backward()
        if scenario.summed:
            torch.stack(losses).sum().backward()
        if ddp is None:
            weight = len(mine) if scenario.weighted else 1
            higher.distributed.all_reduce_grads(meta_params, weight=weight)
        meta_opt.step()
    if ddp is not None:  # every averaging disarmed its hooks: nothing stays on the parameters
        from higher.distributed._ddp import _SYNCS

        assert not _SYNCS[ddp]._handles, "hooks left armed after the last averaging"
    return [p.detach().cpu().clone() for p in meta_params]


# ---- failures ---------------------------------------------------------------------------------


def fail_on_rank_1(hang: bool, timeout: float) -> None:
    """Rank 1 raises (or, with `hang`, stays alive without reducing) before the first reduction;
    rank 0 reaches it and must get a clear error instead of waiting for ever. The raising rank
    is met by `all_reduce_grads`, the hanging one by the averaging of `innerloop_ctx` on DDP.

    The reduction runs on a group with a short timeout: the world's must be long enough for
    both processes to start and connect on a busy machine.
    """
    rank = dist.get_rank()
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=timeout))
    # Ranks that pass different tensors all raise (rank 1 has one parameter fewer).
    mismatched = [torch.zeros(3, requires_grad=True) for _ in range(3 - rank)]
    try:
        higher.distributed.all_reduce_grads(mismatched, group=group)
    except higher.distributed.DistributedError as err:
        print(f"rank {rank} refused: {err}", flush=True)
    model = make_model(CPU)
    ddp = nn.parallel.DistributedDataParallel(model, process_group=group) if hang else None
    if rank == 1:
        if hang:
            time.sleep(2 * timeout)  # past rank 0's timeout
        raise RuntimeError("injected failure on rank 1")
    xs, ys, xq, yq = make_task(0, 0, CPU)
    if ddp is None:
        F.mse_loss(model(xs), ys).backward()
        higher.distributed.all_reduce_grads(model.parameters(), group=group)
        return
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(ddp, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(xs), ys))
        F.mse_loss(fmodel(xq), yq).backward()  # the averaging at its end times out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True, help="FileStore path (shared by the ranks)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--group", required=True, help="equality, raise or hang")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--timeout", type=float, default=3.0, help="a failure's timeout (s)")
    args = parser.parse_args()
    # a hang shows where each rank waits (in its stderr, which the test prints)
    faulthandler.dump_traceback_later(240, exit=True)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", args.rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend,
        init_method=f"file://{Path(args.store).resolve()}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=120),  # both processes start and connect
    )
    if args.group in ("raise", "hang"):
        fail_on_rank_1(hang=args.group == "hang", timeout=args.timeout)
    else:
        results = {name: train(SCENARIOS[name], device) for name in GROUPS[args.group]}
        torch.save(results, args.out / f"rank{args.rank}.pt")
    # No destroy_process_group and no interpreter teardown: after a failure the group cannot
    # agree to close, and on torch 2.1.2 closing hung about one launch in ten on a busy machine
    # even after a success (both results saved).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
