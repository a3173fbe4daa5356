"""The pure step: one inner step as a function of its inputs, the middle of every strategy.

`pure_step(params, opt_state, hyper, buffers, batch, program=...)` runs the model's forward
(`torch.func.functional_call` with the weights and buffers given), the loss, its gradient and
the optimizer's update (`StepPlan.run` of the twin's step plan, which carries the rule and the
hyperparameters), and returns `(params, opt_state, buffers, loss)`. Nothing is modified: the
buffers go in as tensors and come out as new ones (the forward updates running statistics in
place on copies made for this step), so no tensor an earlier step saved for its backward is
ever written, and a step in eval mode reads the statistics of its own time.

What it owns: binding a step's weights and buffers to the model (`bind`), the functional copy's
training modes following the model's (`follow_modes`), the buffers' copy per step
(`fresh_buffers`), which parameters a loss leaves unused (`find_unused`, so they are not
stepped), and the step itself. The strategies wrap it: a compiled step traces it
(`compile_step`), a compiled meta-step scans it (`compile_meta_step`); `gradient=` chooses how
the gradient is taken (`torch.func.grad` inside traces, plain autograd with its graph outside).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from higher.errors import HigherError
from higher.optim.internal import StepPlan

LossFn = Callable[..., torch.Tensor]
#: `(loss_of, live) -> (grads, aux)` where `loss_of(live) -> (loss, aux)`
Gradient = Callable[
    [Callable[[list[torch.Tensor]], tuple[torch.Tensor, Any]], list[torch.Tensor]],
    tuple[Sequence[torch.Tensor], Any],
]
GradCallback = Callable[[list[torch.Tensor | None]], Sequence[torch.Tensor | None]]


class Program(NamedTuple):
    """What a step runs: the module whose forward computes the loss, its parameter names (the
    order of the step's `params`) and `loss_fn(model, *args, **kwargs)`."""

    module: torch.nn.Module
    names: tuple[str, ...]
    loss_fn: LossFn


class Batch(NamedTuple):
    """A step's data: the loss function's positional and keyword arguments after `model`."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class StepOut(NamedTuple):
    """What a step returns: every parameter (those not stepped are the inputs themselves), the
    optimizer's new state (one per bucket of the plan), the new buffers and the loss; `grads`
    are the gradients of the `wrt` parameters (what a caller checks, e.g. which are zero)."""

    params: list[torch.Tensor]
    opt_state: list[Any]
    buffers: dict[str, torch.Tensor]
    loss: torch.Tensor
    grads: list[torch.Tensor]


def follow_modes(copy: torch.nn.Module, model: torch.nn.Module) -> None:
    """Set each submodule of `copy` (a functional copy of `model`) to the training or eval mode
    of its twin in `model`, so that a step runs in the mode the user's model is in now."""
    for twin, sub in zip(copy.modules(), model.modules()):
        twin.training = sub.training


def fresh_buffers(buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new tensor per buffer for one step to update in place: the step's output buffers."""
    return {k: b.clone() for k, b in buffers.items()}


def bind(
    module: torch.nn.Module,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """`module`'s forward with `params` and copies of `buffers` (a callable without
    attributes), and those copies: after the forward, the step's new buffers."""
    new = fresh_buffers(buffers)
    tensors = {**new, **dict(zip(names, params))}

    def model(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(module, tensors, args, kwargs)

    return model, new


def find_unused(
    program: Program,
    params: Sequence[torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    batch: Batch,
    *,
    wrt: Sequence[int],
    error: type[HigherError],
    loss_name: str,
) -> frozenset[int]:
    """The indices among `wrt` of the parameters the loss does not use: they get no update, as
    with `diffopt.step`. One eager forward and gradient on detached copies of `params` (and on
    copies of the buffers, so running statistics move only once per step); a loss that is not a
    scalar, or that does not depend on the parameters, is refused as `error` naming
    `loss_name` (the argument the loss function was given as).

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> program = Program(net, ("weight", "bias"), lambda m, x: m(x).sum())
        >>> find_unused(program, list(net.parameters()), {}, Batch((torch.ones(3, 2),), {}),
        ...             wrt=[0, 1], error=ValueError, loss_name="loss_fn")
        frozenset()
    """
    probe = [p.detach().requires_grad_(p.requires_grad) for p in params]
    model, _ = bind(program.module, program.names, probe, buffers)
    loss = program.loss_fn(model, *batch.args, **batch.kwargs)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise error(f"{loss_name} must return a scalar tensor, got {shape}")
    if not wrt:
        return frozenset()
    if not loss.requires_grad:
        raise error(
            f"the loss does not depend on the model's parameters: {loss_name} must compute it "
            "from what the model it is given returns (model(x))"
        )
    grads = torch.autograd.grad(loss, [probe[i] for i in wrt], allow_unused=True)
    return frozenset(i for i, g in zip(wrt, grads, strict=True) if g is None)


def func_gradient(
    loss_of: Callable[[list[torch.Tensor]], tuple[torch.Tensor, Any]], live: list[torch.Tensor]
) -> tuple[Sequence[torch.Tensor], Any]:
    """The gradient by `torch.func.grad` (what a traced step uses: one graph)."""
    grads, aux = torch.func.grad(loss_of, has_aux=True)(live)
    return grads, aux


def autograd_gradient(
    loss_of: Callable[[list[torch.Tensor]], tuple[torch.Tensor, Any]], live: list[torch.Tensor]
) -> tuple[Sequence[torch.Tensor], Any]:
    """The gradient by plain autograd, with its graph (a step run eagerly; unlike torch.func,
    it also runs under saved-tensor hooks)."""
    with torch.enable_grad():
        loss, aux = loss_of(live)
        return torch.autograd.grad(loss, live, create_graph=True), aux


def pure_step(
    params: Sequence[torch.Tensor],
    opt_state: Sequence[Any] | None,
    hyper: StepPlan,
    buffers: Mapping[str, torch.Tensor],
    batch: Batch,
    *,
    program: Program,
    wrt: Sequence[int],
    gradient: Gradient = func_gradient,
    callback: GradCallback | None = None,
) -> StepOut:
    """One step: the loss of `batch` at `params` (every parameter, in `program.names` order)
    with `buffers`, its gradient with respect to the parameters at `wrt`, and the update of
    `hyper` (the optimizer's step plan: its rule and hyperparameters) from `opt_state` (None:
    the plan's own). Only the gradients of parameters `hyper` steps reach the update; a
    `callback` (grad_callback) sees them first, and its output is checked by the plan.

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> from higher.optim import internal
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD(net.parameters(), lr=0.1),
        ...                                       net.parameters())
        >>> plan = internal.plan(diffopt, list(net.parameters()))
        >>> mse = lambda m, x: m(x).pow(2).mean()
        >>> out = pure_step(list(net.parameters()), None, plan, {}, Batch((torch.ones(3, 2),), {}),
        ...                 program=Program(net, ("weight", "bias"), mse), wrt=[0, 1])
        >>> out.loss.shape, len(out.params), out.buffers
        (torch.Size([]), 2, {})
    """
    loss_fn, args, kwargs = program.loss_fn, batch.args, batch.kwargs

    def loss_of(
        live: list[torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        current = list(params)
        for k, i in enumerate(wrt):
            current[i] = live[k]
        model, new = bind(program.module, program.names, current, buffers)
        loss = loss_fn(model, *args, **kwargs)
        return loss, (loss, new)

    grads, (loss, new_buffers) = gradient(loss_of, [params[i] for i in wrt])
    stepped = {i for bucket in hyper.buckets for i in bucket.indices}
    full: list[torch.Tensor | None] = [None] * len(params)
    for k, i in enumerate(wrt):
        if i in stepped:
            full[i] = grads[k]
    if callback is None:
        result = hyper.run(params, full, opt_state)
    else:
        result = hyper.update(params, list(callback(full)), opt_state)
    return StepOut(list(result.params), list(result.states), new_buffers, loss, list(grads))
