"""Meta-training across processes and machines on `torch.distributed` (gloo, NCCL; torchrun).

Each rank runs the ordinary `innerloop_ctx` loop on its share of the tasks; the meta-gradients
are averaged across the ranks so that every rank takes the same outer step. Two ways:

- Without DDP: `shard(tasks)` gives this rank's tasks; after their backward passes,
  `all_reduce_grads(params, weight=len(my_tasks))` averages the gradients (the parameters', and
  those of learnable hyperparameters passed along), weighted so that uneven shares give the mean
  over all tasks; then `meta_opt.step()`. Accumulating several meta-batches is calling it once,
  after the last.
- With `torch.nn.parallel.DistributedDataParallel`: `innerloop_ctx(ddp_model, opt)` patches
  `ddp_model.module` and averages the meta-gradients at the end of each backward pass, as DDP
  does; `ddp_model.no_sync()` accumulates locally.

Without a process group every function acts as rank 0 of 1, so one script runs under
`torchrun` and as a plain `python` process alike. Importing this module initializes nothing.

What lives where: `_shard.py` owns `shard`, `world` and `all_reduce_grads` (and the checks that
the ranks agree); `_ddp.py` owns the meta-gradient averaging of an inner loop on a
`DistributedDataParallel` model. The errors are core's (`_errors.py`).

Examples:
    >>> import higher.distributed
    >>> higher.distributed.shard(range(10), rank=1, world_size=3)
    [4, 5, 6]
"""

from higher._errors import DistributedError as DistributedError
from higher._errors import DistributedValueError as DistributedValueError
from higher.distributed._shard import World as World
from higher.distributed._shard import all_reduce_grads as all_reduce_grads
from higher.distributed._shard import shard as shard
from higher.distributed._shard import world as world

__all__ = [
    "shard",
    "all_reduce_grads",
    "world",
    "World",
    "DistributedError",
    "DistributedValueError",
]
