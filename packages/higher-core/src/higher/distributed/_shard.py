"""Sharding tasks over ranks and averaging meta-gradients across them (`higher.distributed`).

Nothing here initializes `torch.distributed`: without a process group (a plain `python` run)
every function acts as rank 0 of a world of 1, so one script runs with or without `torchrun`.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar, overload

import torch
import torch.distributed as dist

from higher._errors import DistributedError, DistributedValueError, UsageError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")


# ---- which rank of how many -------------------------------------------------------------------


class World(NamedTuple):
    """This process's rank and the number of ranks (0 and 1 without a process group)."""

    rank: int
    size: int


def world(group: ProcessGroup | None = None) -> World:
    """This process's rank and the number of ranks in `group` (default: the whole world).

    Without an initialized process group this is rank 0 of 1, unless a launcher's `WORLD_SIZE`
    says there are several processes: then forgetting `init_process_group` is an error, not a
    silent world of one whose ranks would each train alone.

    Examples:
        >>> higher.distributed.world()  # a plain `python` run
        World(rank=0, size=1)
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(group), dist.get_world_size(group))
    if group is not None:
        raise DistributedError("a process group was given but torch.distributed is not initialized")
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.strip() not in ("", "1"):
        how = "is initialized" if dist.is_available() else "is available in this torch build"
        raise DistributedError(
            f"WORLD_SIZE={launched} says this is one of several processes (torchrun sets it), "
            f"but no torch.distributed process group {how}: call "
            "torch.distributed.init_process_group(...) before sharding or reducing"
        )
    return World(0, 1)


# ---- which tasks this rank takes --------------------------------------------------------------


@overload
def shard(
    tasks: int,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: ProcessGroup | None = None,
) -> range: ...


@overload
def shard(
    tasks: Sequence[T],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: ProcessGroup | None = None,
) -> list[T]: ...


def shard(
    tasks: int | Sequence[T],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: ProcessGroup | None = None,
) -> range | list[T]:
    """This rank's share of `tasks`: a contiguous block, the first `n % world_size` ranks one more.

    The blocks of all ranks, in rank order, are `tasks` again, so the ranks together run every
    task once. With `n` tasks for `w` ranks a rank runs `n // w` or `n // w + 1` of them; a rank
    may get none when `n < w`. `tasks` may be a sequence (its items are returned as a list) or a
    count `n` (the indices are returned as a `range`). `rank` and `world_size` default to the
    process group's (rank 0 of 1 without one).

    Examples:
        >>> higher.distributed.shard(5, rank=0, world_size=2)
        range(0, 3)
        >>> higher.distributed.shard(["a", "b", "c", "d", "e"], rank=1, world_size=2)
        ['d', 'e']
    """
    if (rank is None) != (world_size is None):
        raise DistributedValueError("give both rank and world_size, or neither (the group's)")
    if rank is None or world_size is None:
        rank, world_size = world(group)
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise DistributedValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise DistributedValueError(f"rank must be in [0, {world_size}), got {rank}")
    if isinstance(tasks, bool) or not isinstance(tasks, (int, Sequence)):
        raise UsageError(f"tasks must be a sequence or a count, got {type(tasks).__name__}")
    n = tasks if isinstance(tasks, int) else len(tasks)
    if n < 0:
        raise DistributedValueError(f"the number of tasks must be at least 0, got {n}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    if isinstance(tasks, int):
        return range(start, stop)
    return list(tasks[start:stop])


# ---- averaging gradients across ranks ---------------------------------------------------------


def _tensor_list(
    tensors: torch.nn.Module | Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], ProcessGroup | None]:
    """The distinct tensors to reduce, in order, and a DDP model's process group (if one)."""
    group = None
    if isinstance(tensors, torch.nn.parallel.DistributedDataParallel):
        group = tensors.process_group
    if isinstance(tensors, torch.nn.Module):  # its trainable parameters, as DDP reduces
        tensors = [p for p in tensors.parameters() if p.requires_grad]
    elif isinstance(tensors, torch.Tensor):
        raise UsageError("pass an iterable of tensors (e.g. [lr]), not a single tensor")
    listed: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if id(t) not in seen:  # a tied weight's gradient is reduced once
            seen.add(id(t))
            listed.append(t)
    if not listed:
        raise DistributedValueError("no tensors to reduce: pass the parameters (or a module)")
    for i, t in enumerate(listed):
        grad = t.grad
        if grad is None:
            continue
        if grad.requires_grad:
            raise DistributedValueError(
                f"tensors[{i}].grad carries a graph (backward(create_graph=True)): an all-reduce "
                "is not differentiable; take the meta-gradient with a plain backward()"
            )
        if grad.layout != torch.strided:
            raise DistributedValueError(f"tensors[{i}].grad is {grad.layout}: only dense grads")
    return listed, group


def _checked_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UsageError(f"weight must be a number, got {type(weight).__name__}")
    if not math.isfinite(weight) or weight < 0:
        raise DistributedValueError(f"weight must be finite and at least 0, got {weight}")
    return float(weight)


def _buckets(tensors: Sequence[torch.Tensor], cap_bytes: float) -> list[list[int]]:
    """Indices of `tensors` grouped by dtype and device, cut into buckets of about `cap_bytes`.

    A bucket is closed when the next tensor would take it past the cap, so a tensor larger than
    the cap gets a bucket of its own; the order within a (dtype, device) group is kept.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    buckets: list[list[int]] = []
    for indices in groups.values():
        current: list[int] = []
        size = 0
        for i in indices:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if current and size + nbytes > cap_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        buckets.append(current)
    return buckets


def _fingerprints(tensors: Sequence[torch.Tensor], buckets: list[list[int]]) -> tuple[int, int]:
    """Two independent 16-bit hashes of what each rank is about to reduce (shapes, dtypes,
    device kinds, buckets): equal on every rank, or the reduction would mix unrelated values."""
    layout = repr(
        ([(tuple(t.shape), str(t.dtype), t.device.type) for t in tensors], buckets)
    ).encode()
    return zlib.crc32(layout) & 0xFFFF, zlib.adler32(layout) & 0xFFFF


_NO_WEIGHT = (
    "every rank passed weight 0: there is no gradient to average (no rank ran a task; without "
    "a process group this process is every rank): pass the number of tasks this rank ran"
)


def _collective_failed(err: BaseException, size: int, hint: str) -> DistributedError:
    return DistributedError(
        f"the all-reduce of the gradients across {size} ranks failed: a rank raised, exited, or "
        f"did not reach the same reduction before the process group's timeout{hint} "
        f"({type(err).__name__}: {err})"
    )


def all_reduce_grads(
    tensors: torch.nn.Module | Iterable[torch.Tensor],
    *,
    weight: float = 1.0,
    group: ProcessGroup | None = None,
    bucket_cap_mb: float = 25.0,
) -> float:
    """Average the `.grad` of `tensors` across ranks, weighted; returns the sum of the weights.

    Every rank ends with the same gradients, `sum_r weight_r * grad_r / sum_r weight_r`, so every
    rank's outer optimizer takes the same step. If each rank's gradient is the mean over its own
    tasks (each task's loss divided by the number of tasks this rank ran) and `weight` is that
    number, the result is the mean over all tasks of all ranks: exactly what one process running
    every task computes, however unevenly the tasks are shared. The default weight 1 gives the
    plain mean over ranks (what `DistributedDataParallel` does).

    Call it once per outer step, after the backward passes of all the tasks (and of all the
    meta-batches being accumulated) and before `meta_opt.step()`. The gradients are flattened
    into buckets of about `bucket_cap_mb` (one per dtype and device at least), each reduced by
    one `all_reduce`. A tensor without a gradient on a rank counts as a zero there; one without
    a gradient on every rank is left without one. Learnable hyperparameters (the tensors given
    as `override` to `innerloop_ctx`) are averaged the same way: pass them along.

    Without a process group (a plain `python` run) this changes nothing and returns `weight`;
    `weight=0` is refused there as when every rank passes 0 (this process is every rank).
    Every rank must call it, with the same tensors in the same order; if they pass different
    ones, all ranks raise `DistributedError`. A rank that fails or never calls it makes the
    others raise `DistributedError` when the process group's timeout expires.

    Args:
        tensors: the tensors whose `.grad` to average (the parameters of the meta-optimizer), or
            a module (its parameters that require grad; a `DistributedDataParallel` model's own
            process group is then the default `group`).
        weight: this rank's share of the average (e.g. its number of tasks); 0 for a rank that
            ran none.
        group: the process group (default: the whole world).
        bucket_cap_mb: about how many MiB of gradients one `all_reduce` carries.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> (3 * w).sum().backward()
        >>> higher.distributed.all_reduce_grads([w], weight=4)  # alone: nothing to average
        4.0
        >>> w.grad
        tensor([3., 3.])
    """
    listed, ddp_group = _tensor_list(tensors)
    weight = _checked_weight(weight)
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise UsageError(f"bucket_cap_mb must be a number, got {type(bucket_cap_mb).__name__}")
    if not bucket_cap_mb > 0:
        raise DistributedValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
    return reduce_grads(listed, weight, group if group is not None else ddp_group, bucket_cap_mb)


def reduce_grads(
    listed: Sequence[torch.Tensor],
    weight: float,
    group: ProcessGroup | None,
    bucket_cap_mb: float = 25.0,
    hint: str = "",
) -> float:
    """`all_reduce_grads` on checked arguments; `hint` ends the message of a failed collective."""
    size = world(group).size
    if size == 1:  # alone, this rank is every rank
        if weight == 0:
            raise DistributedValueError(_NO_WEIGHT)
        return weight
    buckets = _buckets(listed, bucket_cap_mb * 2**20)
    f, g = _fingerprints(listed, buckets)
    device = listed[0].device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise DistributedValueError(
            f"the NCCL backend reduces CUDA tensors only, got tensors on {device}: move the "
            "model to its rank's GPU (torch.cuda.set_device(local_rank); model.to(local_rank))"
        )
    # One small reduction first: the total weight, and the layout hashes with their squares
    # (sum f == size * f and sum f^2 == size * f^2 on a rank only if every rank has that f).
    header = torch.tensor([weight, f, f * f, g, g * g], dtype=torch.float64, device=device)
    try:
        dist.all_reduce(header, group=group)
    except RuntimeError as err:
        raise _collective_failed(err, size, hint) from err
    total, *sums = header.tolist()
    if sums != [size * f, size * f * f, size * g, size * g * g]:
        raise DistributedError(
            "the ranks passed different tensors to all_reduce_grads (their number, shapes, "
            "dtypes or devices differ): every rank must pass the same parameters in the same order"
        )
    if total == 0:
        raise DistributedValueError(_NO_WEIGHT)
    flats = []
    for bucket in buckets:
        grads = [listed[i].grad for i in bucket]
        parts = [
            torch.zeros_like(listed[i]).reshape(-1) if grad is None else grad.reshape(-1)
            for i, grad in zip(bucket, grads)
        ]
        # One flag per tensor after its values: how many ranks had a gradient for it.
        flags = [0.0 if grad is None else 1.0 for grad in grads]
        parts.append(torch.tensor(flags, dtype=listed[bucket[0]].dtype, device=parts[0].device))
        flat = torch.cat(parts)
        if weight != 1.0:
            flat[: -len(bucket)].mul_(weight)
        flats.append(flat)
    try:
        works = [dist.all_reduce(flat, group=group, async_op=True) for flat in flats]
        for work in works:
            assert work is not None  # async_op=True returns the pending work
            work.wait()
    except RuntimeError as err:
        raise _collective_failed(err, size, hint) from err
    for bucket, flat in zip(buckets, flats):
        flags = flat[-len(bucket) :].tolist()
        offset = 0
        for i, had_grad in zip(bucket, flags):
            t = listed[i]
            values = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
            if had_grad == 0:
                continue  # no rank had a gradient: leave it without one, as one process would
            values.div_(total)
            if t.grad is None:
                t.grad = values.clone()
            else:
                t.grad.copy_(values)  # in place: DDP's gradient-as-bucket-view stays a view
    return float(total)
