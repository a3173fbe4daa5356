"""`innerloop_ctx` on a `DistributedDataParallel` model: average the meta-gradients as DDP would.

DDP averages gradients only for backward passes that follow its own `forward`, which prepares
its reducer. The functional copy of an inner loop never runs that forward, so on its own DDP
leaves the meta-gradients local (each rank would step alone) — and a DDP wrapper cannot even be
copied (its process-group handles do not pickle). So `innerloop_ctx` patches `ddp.module`, and
this module does the averaging instead: each inner loop arms hooks on the tensors its
meta-gradient reaches (the parameters with `copy_initial_weights=False`, and the leaves of
learnable hyperparameters); the first gradient a backward pass accumulates into one of them
queues a callback for the end of that pass, which averages them across the DDP's process group
unless the pass ran inside `ddp.no_sync()`. Ranks are weighted by the number of inner loops
they armed since the last averaging, so uneven shares of tasks give the mean over all tasks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from higher.distributed._shard import reduce_grads
from higher.optim import DifferentiableOptimizer

_HINT = (
    "; with innerloop_ctx(ddp_model, ...) every backward pass outside ddp.no_sync() averages, so "
    "all ranks must run the same number of them: with uneven tasks and one backward per task, "
    "run all but each rank's last backward inside ddp.no_sync()"
)


def _queue_end_of_backward(callback: Callable[[], None]) -> None:
    # The autograd engine's hook for "this backward pass is done": DDP's reducer and FSDP use it.
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors that require grad and from which `tensor` is computed (itself if a leaf)."""
    if tensor.grad_fn is None:
        return [tensor] if tensor.requires_grad else []
    found: list[torch.Tensor] = []
    stack: list[Any] = [tensor.grad_fn]  # autograd Nodes (None for inputs without a grad)
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if isinstance(variable, torch.Tensor):
            found.append(variable)
        else:
            stack.extend(child for child, _ in reversed(node.next_functions))
    return found


def learnable_leaves(diffopt: DifferentiableOptimizer) -> list[torch.Tensor]:
    """The leaves behind the optimizer's hyperparameters that require grad (e.g. `override`)."""
    found: list[torch.Tensor] = []
    for group in diffopt.param_groups:
        for name, value in group.items():
            if name == "params":
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if isinstance(v, torch.Tensor) and v.requires_grad:
                    found.extend(_leaves(v))
    return found


class _MetaGradientSync:
    """The armed tensors of one DDP model, the number of inner loops since the last averaging."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        self._ddp = weakref.ref(ddp)  # the registry's value must not keep its key alive
        self._group = ddp.process_group
        self._tensors: list[torch.Tensor] = []
        self._handles: dict[int, RemovableHandle] = {}
        self._inner_loops = 0
        self._queued = False

    def arm(self, tensors: Iterable[torch.Tensor], loops: int = 1) -> None:
        """Count `loops` more inner loops, whose meta-gradients may reach `tensors`."""
        for t in tensors:
            if id(t) not in self._handles:
                self._handles[id(t)] = t.register_post_accumulate_grad_hook(self._accumulated)
                self._tensors.append(t)
        self._inner_loops += loops
        self._queued = False  # a backward that raised midway never ran its callback

    def _accumulated(self, tensor: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            _queue_end_of_backward(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        ddp = self._ddp()
        if ddp is None or not ddp.require_backward_grad_sync:
            return  # inside ddp.no_sync(): accumulate locally until a backward outside it
        tensors, weight = self._tensors, self._inner_loops
        self._disarm()
        reduce_grads(tensors, float(weight), self._group, hint=_HINT)

    def _disarm(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._tensors = []
        self._inner_loops = 0


_SYNCS: weakref.WeakKeyDictionary[torch.nn.Module, _MetaGradientSync] = weakref.WeakKeyDictionary()


def arm_inner_loop(
    ddp: torch.nn.parallel.DistributedDataParallel,
    diffopt: DifferentiableOptimizer,
    copy_initial_weights: bool,
    loops: int = 1,
) -> None:
    """Register `loops` inner loops (a batch of tasks: one per task) on `ddp`: their
    meta-gradients will be averaged across the ranks."""
    if not torch.is_grad_enabled():
        return  # no graph is recorded: no meta-gradient can come of this inner loop
    tensors: list[torch.Tensor] = []
    if not copy_initial_weights:
        tensors += [p for p in ddp.parameters() if p.requires_grad]
    tensors += learnable_leaves(diffopt)
    if not tensors:
        return  # nothing a backward could reach (copied weights, constant hyperparameters)
    sync = _SYNCS.get(ddp)
    if sync is None:
        sync = _SYNCS[ddp] = _MetaGradientSync(ddp)
    sync.arm(tensors, loops)
