"""Errors of the top-level API (all share the `HigherError` base of every distribution)."""

from __future__ import annotations

from higher.errors import HigherError


class UsageError(HigherError, TypeError):
    """A top-level function got an argument of the wrong kind (also a `TypeError`).

    Examples:
        >>> try:
        ...     with higher.innerloop_ctx("model", None):  # type: ignore[arg-type]
        ...         pass
        ... except higher.UsageError as err:
        ...     print(err)
        model must be a torch.nn.Module, got str
    """

    __module__ = "higher"  # its public path, for tracebacks, pickle and the docs


class DistributedError(HigherError, RuntimeError):
    """Ranks disagree, or a collective across them failed (also a `RuntimeError`).

    Raised by `higher.distributed` when the ranks pass different tensors to one reduction, when
    a rank raised, exited or never reached the reduction before the process group's timeout, or
    when a launcher says there are several processes but `torch.distributed` is not initialized.

    Examples:
        >>> issubclass(higher.distributed.DistributedError, RuntimeError)
        True
    """

    __module__ = "higher.distributed"  # its public path, for tracebacks, pickle and the docs


class DistributedValueError(HigherError, ValueError):
    """An argument of `higher.distributed` has a wrong value (also a `ValueError`).

    Examples:
        >>> try:
        ...     higher.distributed.shard(range(4), rank=2, world_size=2)
        ... except higher.distributed.DistributedValueError as err:
        ...     print(err)
        rank must be in [0, 2), got 2
    """

    __module__ = "higher.distributed"  # its public path, for tracebacks, pickle and the docs


class ImplicitError(HigherError, ValueError):
    """`higher.implicit` got a malformed problem: a loss that is not a scalar, a hyperparameter
    that does not require grad, weights the inner loss does not depend on, a bad solver option
    (also a `ValueError`).

    Examples:
        >>> try:
        ...     higher.implicit.CG(tol=-1.0)
        ... except higher.implicit.ImplicitError as err:
        ...     print(err)
        CG: tol must be a finite number >= 0, got -1.0
    """

    __module__ = "higher.implicit"  # its public path, for tracebacks, pickle and the docs


class UnrollError(HigherError, ValueError):
    """A memory mode of `innerloop_ctx(..., unroll=...)` cannot do what was asked (also a
    `ValueError`): the message says why and what to use instead.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with higher.innerloop_ctx(model, opt, unroll="recompute") as (fmodel, diffopt):
        ...     try:
        ...         diffopt.step(fmodel(torch.ones(1, 2)).sum())
        ...     except higher.UnrollError as err:
        ...         print(str(err)[:46])
        unroll='recompute' rebuilds each step during t
    """

    __module__ = "higher"  # its public path, for tracebacks, pickle and the docs


class CompositionError(UsageError, ValueError):
    """Strategies that do not compose were asked for together: a memory mode with batched
    tasks, a memory mode compiled, ... The message names the combination and what to use
    instead; every combination's entry is in docs/composition.md. Also a `ValueError`, and a
    `UsageError` (so a `TypeError`), as the refusals it replaces were.

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> try:
        ...     with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1),
        ...                               unroll="recompute", tasks=4):
        ...         pass
        ... except higher.CompositionError as err:
        ...     print(str(err)[:62])
        unroll='recompute' with tasks=T in innerloop_ctx(..., compile=
    """

    __module__ = "higher"  # its public path, for tracebacks, pickle and the docs


class FastPathError(HigherError, ValueError):
    """A fast path (batched tasks, the compiled meta-step) refused its input: a value of the
    wrong shape, or a model, optimizer or torch it cannot run exactly (also a `ValueError`).

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> try:
        ...     with higher.batched_innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1),
        ...                                       tasks=0):
        ...         pass
        ... except higher.FastPathError as err:
        ...     print(err)
        tasks must be a positive int (the number of tasks batched), got 0
    """

    __module__ = "higher"  # its public path, for tracebacks, pickle and the docs


class EstimatorError(HigherError, ValueError):
    """A gradient estimator of `higher.estimators` got a bad setting or a malformed unroll: too
    few particles for a standard error, a loss that is not one number per particle, particles
    whose states differ in more than their tensors (also a `ValueError`).

    Examples:
        >>> try:
        ...     higher.estimators.PES(lambda m, s: (s, m[0].sum()), lambda m: (), particles=3)
        ... except higher.estimators.EstimatorError as err:
        ...     print(str(err)[:58])
        PES: antithetic particles come in pairs, so particles must
    """

    __module__ = "higher.estimators"  # its public path, for tracebacks, pickle and the docs
