"""Building differentiable optimizers: `get_diff_optim`, `create_diff_optim`, trainable hypers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ._base import DifferentiableOptimizer
from ._errors import ArgumentTypeError, OptimError
from ._protocols import FunctionalModel
from ._registry import twin_of


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[torch.Tensor],
    fmodel: FunctionalModel | None = None,
    device: torch.device | str | None = None,
    override: Mapping[str, Sequence[Any]] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable twin of torch optimizer `opt`, with its hyperparameters and state.

    Args:
        opt: a torch optimizer (a subclass of a supported one resolves to its parent's twin).
        reference_params: the parameters `opt` was built on, in the order `step` takes them.
        fmodel: the functional model `step` updates (see `DifferentiableOptimizer`).
        device: where to put the copied state.
        override: hyperparameter -> values, one for all groups or one per group.
        track_higher_grads: False makes each step first order.
        **kwargs: passed to the twin's constructor.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.Adam([w]), [w])
        >>> type(diffopt).__name__
        'DifferentiableAdam'
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"expected a torch.optim.Optimizer instance, got {type(opt).__name__}"
        )
    twin = twin_of(type(opt))
    return twin(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]] | None = None,
    fmodel: FunctionalModel | None = None,
    device: torch.device | str | None = None,
    override: Mapping[str, Sequence[Any]] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer of type `opt_type` without a torch optimizer at hand.

    The torch optimizer is built on placeholders shaped like `params` (tensors, or param-group
    dicts `{"params": [...], "lr": ...}`) or like `fmodel.fast_params`; `step` then takes the
    tensors in that (flattened) order.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.ones(2, requires_grad=True)
        >>> diffopt = higher.optim.create_diff_optim(torch.optim.SGD, {"lr": 0.5}, params=[w])
        >>> diffopt.step((w**2).sum(), params=[w])[0].tolist()
        [0.0, 0.0]
    """
    if params is None:
        if fmodel is None or fmodel.fast_params is None:
            raise OptimError("create_diff_optim needs params= or an fmodel with fast weights")
        params = list(fmodel.fast_params)
    entries = list(params)
    if not entries:
        raise OptimError("create_diff_optim got no parameters")

    def placeholder(p: Any) -> torch.Tensor:
        if not isinstance(p, torch.Tensor):
            raise ArgumentTypeError(
                f"params must hold tensors or param-group dicts, got {type(p).__name__}"
            )
        return torch.zeros(p.shape, dtype=p.dtype, device=p.device, requires_grad=True)

    reference: list[torch.Tensor] = []
    groups: list[dict[str, Any]] = []
    if all(isinstance(e, Mapping) for e in entries):
        for entry in entries:
            assert isinstance(entry, Mapping)
            if "params" not in entry:
                raise OptimError(f"a param-group dict needs a 'params' key, got {sorted(entry)}")
            members = entry["params"]
            members = [members] if isinstance(members, torch.Tensor) else list(members)
            holders = [placeholder(p) for p in members]
            reference.extend(holders)
            groups.append({**entry, "params": holders})
    elif any(isinstance(e, Mapping) for e in entries):
        raise OptimError("params must be all tensors or all param-group dicts, not a mix")
    else:
        reference = [placeholder(p) for p in entries]
        groups = [{"params": reference}]
    opt = opt_type(groups, **dict(opt_kwargs or {}))
    return get_diff_optim(
        opt,
        reference,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: torch.device | str | None = None
) -> dict[str, list[Any]]:
    """Every numeric hyperparameter of `opt` as float tensors that require grad.

    Returns a dict name -> one value per param group, ready to pass as `override`: a number
    becomes a 0-d tensor, a pair (betas) a tuple of 0-d tensors. Flags (bools), None and
    other values are left out.

    Examples:
        >>> import torch, higher.optim
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, nesterov=False)
        >>> hyper = higher.optim.get_trainable_opt_params(opt)
        >>> hyper["lr"][0].requires_grad, "nesterov" in hyper
        (True, False)
    """

    def trainable(value: float) -> torch.Tensor:
        dtype = torch.get_default_dtype()
        return torch.tensor(float(value), dtype=dtype, device=device, requires_grad=True)

    found: dict[str, list[Any]] = {}
    names = [k for k in opt.param_groups[0] if k != "params"]
    for name in names:
        values: list[Any] = []
        for group in opt.param_groups:
            value = group.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(trainable(value))
            elif isinstance(value, tuple) and value and all(_is_number(v) for v in value):
                values.append(tuple(trainable(v) for v in value))
            else:
                break
        else:
            found[name] = values
    return found


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Mapping[str, Any]) -> None:
    """Write hyperparameter values (tensors) back into `opt`, with their original Python types.

    Examples:
        >>> import torch, higher.optim
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> higher.optim.apply_trainable_opt_params(opt, {"lr": [torch.tensor(0.5)]})
        >>> opt.param_groups[0]["lr"]
        0.5
    """

    n_groups = len(opt.param_groups)
    for name, values in override.items():
        if not isinstance(values, (list, tuple)) or len(values) not in (1, n_groups):
            raise OptimError(
                f"override[{name!r}] must be a list of 1 or {n_groups} values, got {values!r}"
            )
        for g, group in enumerate(opt.param_groups):
            value = values[0] if len(values) == 1 else values[g]
            group[name] = _cast_like(group.get(name), value)


def _cast_like(like: Any, value: Any) -> Any:
    """`value` (a tensor, a number, or a tuple of them) as the Python type of `like`.

    A module function, not a recursive closure: that would be a reference cycle."""
    if isinstance(like, bool):
        return like
    if isinstance(like, tuple) and isinstance(value, (tuple, list)):
        return tuple(_cast_like(a, b) for a, b in zip(like, value, strict=True))
    number = value.item() if isinstance(value, torch.Tensor) else value
    if isinstance(like, int) and float(number).is_integer():
        return int(number)
    if isinstance(like, int):
        return float(number)
    if isinstance(like, float):
        return float(number)
    return value
