"""`innerloop_ctx`: a functional model and a differentiable optimizer for one inner loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from higher._errors import UnrollError, UsageError
from higher._unroll.modes import ForwardMode, Full, Mode, resolve
from higher._unroll.routing import Driver, attach, check_routable
from higher.optim import DifferentiableOptimizer, get_diff_optim, twin_of
from higher.patch import FunctionalModule, monkeypatch


@contextlib.contextmanager
def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Sequence[Any]] | None = None,
    track_higher_grads: bool = True,
    unroll: str | Mode = "full",
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """Yield `(fmodel, diffopt)`: a functional copy of `model` and the twin of `opt`.

    `diffopt.step(loss)` takes a step of `opt`'s rule out of place and makes the new weights
    `fmodel`'s current ones, so a loss after `k` steps is differentiable with respect to the
    initial weights (with `copy_initial_weights=False`, `model.parameters()` themselves), the
    hyperparameters given as tensors in `override`, and the data. Neither `model` nor `opt` is
    changed.

    Args:
        model: the module to unroll.
        opt: a torch optimizer over `model.parameters()` (its hyperparameters and state are
            copied; a stepped optimizer's moments carry over).
        device: where fast weights, buffers and optimizer state live (default: where they are).
        copy_initial_weights: False makes the first fast weights `model.parameters()`, so a
            meta-loss's `backward()` fills their `.grad` (MAML); True detaches them.
        override: hyperparameter -> values (one, or one per param group); tensors that require
            grad make that hyperparameter learnable.
        track_higher_grads: False makes each step first order: no graph through the updates.
            With `copy_initial_weights=False` the gradient of a loss on the adapted weights
            still reaches `model.parameters()` (first-order MAML).
        unroll: how the unroll pays for its meta-gradient (docs/memory-modes.md): "full"
            (every step's graph is kept: the default), "recompute" or `higher.Recompute(every=c)`
            (exact, each step rebuilt during the backward pass: a fraction of the memory),
            `higher.Truncated(window=W)` (the last W steps only), "forward" or
            `higher.ForwardMode(wrt=[...])` (exact for a few hyperparameters, memory flat in the
            number of steps). Recompute and truncated take the loss as a closure:
            `diffopt.step(closure=lambda: loss_fn(fmodel(x), y))`. In these modes the fast
            weights of earlier steps are not kept (`fmodel.keep_history` is False).

    A `torch.nn.parallel.DistributedDataParallel` model is patched through its `module`, and
    the meta-gradients that reach its parameters (and learnable hyperparameters) are averaged
    across its ranks at the end of each backward pass outside `ddp.no_sync()`, weighted by the
    number of inner loops each rank ran: see `higher.distributed`.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         _ = diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        ...     torch.nn.functional.mse_loss(fmodel(x), y).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """
    check_model_and_opt(model, opt)
    mode = resolve(unroll)
    ddp = None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # The wrapper holds process-group handles (not copyable): patch the model it wraps.
        ddp, model = model, model.get_submodule("module")
    if not isinstance(mode, Full):
        with _unrolled(model, opt, device, copy_initial_weights, override, track_higher_grads,
                       mode, ddp) as pair:  # fmt: skip
            yield pair
        return
    fmodel = monkeypatch(
        model,
        device=device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    if ddp is not None:
        # torch.distributed is touched only for a DDP model
        from higher.distributed._ddp import arm_inner_loop

        arm_inner_loop(ddp, diffopt, copy_initial_weights)
    yield fmodel, diffopt


@contextlib.contextmanager
def _unrolled(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    override: Mapping[str, Sequence[Any]] | None,
    track_higher_grads: bool,
    mode: Mode,
    ddp: torch.nn.parallel.DistributedDataParallel | None,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """`innerloop_ctx` in a memory mode: the optimizer's `step` is the mode's."""
    from higher._unroll.forward import ForwardDriver
    from higher._unroll.recompute import RecomputeDriver

    if not track_higher_grads:
        raise UnrollError(
            f"unroll={mode!r} saves the memory of a second-order unroll; with "
            "track_higher_grads=False no step keeps a graph, so there is nothing to save: "
            "drop unroll="
        )
    twin = twin_of(type(opt))
    check_routable(twin)
    fmodel = monkeypatch(
        model, device=device, copy_initial_weights=copy_initial_weights, track_higher_grads=True
    )
    fmodel.keep_history = False
    diffopt = twin(opt, model.parameters(), fmodel=fmodel, device=device, override=override)
    driver: Driver
    if isinstance(mode, ForwardMode):
        driver = ForwardDriver(mode, fmodel, list(model.parameters()), copy_initial_weights)
    else:
        assert not isinstance(mode, Full)
        driver = RecomputeDriver(mode, fmodel, diffopt)
    attach(diffopt, driver)
    if ddp is not None:
        from higher.distributed._ddp import arm_inner_loop

        arm_inner_loop(ddp, diffopt, copy_initial_weights)
    try:
        yield fmodel, diffopt
    finally:
        attach(diffopt, None)
        driver.close(diffopt)


def check_model_and_opt(model: object, opt: object) -> None:
    """Refuse a model that is no module, or an optimizer that is no torch optimizer."""
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(opt, torch.optim.Optimizer):
        raise UsageError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
