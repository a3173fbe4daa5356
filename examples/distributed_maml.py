"""The digits MAML of maml_digits.py, with its tasks sharded across processes (torch.distributed).

    torchrun --nproc-per-node 2 examples/distributed_maml.py [--smoke]   # 2 processes (gloo)
    python examples/distributed_maml.py [--smoke]                         # or one, as the demo

Each meta-batch of tasks is split over the processes (`higher.distributed.shard`): every process
runs the demo's own inner loop (`maml_digits.meta_gradient`, `higher.innerloop_ctx`) on its
share, then `higher.distributed.all_reduce_grads` averages the meta-gradients, weighted by how
many tasks each process ran, so every process takes the same Adam step: the one a single process
running every task takes. The held-out evaluation is split the same way and the accuracies
gathered, so the printed accuracy is the single process's (up to float32 rounding, which differs
with the order in which the gradients are summed).

Everything else — data, tasks, model, evaluation, the learning curve — is maml_digits.py's. The
launch options (several machines, SLURM, GPUs) are in docs/distributed.md.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import higher.distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from examples import maml_digits
from examples.maml_digits import Config, Estimate, Task

DEFAULT_OUT = Path(__file__).parent / "output" / "distributed_maml.png"


def gathered(mine: Sequence[float], total: int) -> list[float]:
    """The values every process computed for its shard of `total` items, in item order."""
    values = torch.zeros(total, dtype=torch.float64)
    share = higher.distributed.shard(total)
    values[share.start : share.stop] = torch.tensor(list(mine), dtype=torch.float64)
    if higher.distributed.world().size > 1:
        dist.all_reduce(values)  # each item is non-zero on one process only: the sum gathers
    return values.tolist()


def sharded_train_step(
    model: nn.Module, meta_opt: torch.optim.Optimizer, tasks: Sequence[Task], cfg: Config
) -> float:
    """maml_digits.meta_train_step on this process's share of `tasks`, gradients averaged."""
    mine = higher.distributed.shard(tasks)
    meta_opt.zero_grad()
    scores = maml_digits.meta_gradient(model, mine, cfg) if mine else []
    higher.distributed.all_reduce_grads(model, weight=len(mine))
    meta_opt.step()
    all_scores = gathered(scores, len(tasks))
    return sum(all_scores) / len(all_scores)


def sharded_evaluate(
    init_for_task: Callable[[int], nn.Module],
    tasks: Sequence[Task],
    cfg: Config,
    desc: str | None = None,
) -> Estimate:
    """maml_digits.evaluate, each process adapting to its share of the tasks."""
    share = higher.distributed.shard(len(tasks))
    scores = [maml_digits.adapt_and_score(init_for_task(i), tasks[i], cfg) for i in share]
    return maml_digits.estimate(gathered(scores, len(tasks)))


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out = maml_digits.parse_args(argv, default_out=DEFAULT_OUT)
    torch.set_num_threads(1)  # tiny tensors: more threads cost more than they save
    torch.use_deterministic_algorithms(True)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: it sets RANK, WORLD_SIZE, MASTER_*
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, size = higher.distributed.world()
    try:
        start = time.perf_counter()
        maml, baseline = maml_digits.run(
            cfg, out if rank == 0 else None, sharded_train_step, sharded_evaluate
        )
        if rank == 0:
            print(f"{size} process{'es' if size > 1 else ''} (torch.distributed, gloo)")
            print(maml_digits.report(cfg, maml, baseline, out, time.perf_counter() - start))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
