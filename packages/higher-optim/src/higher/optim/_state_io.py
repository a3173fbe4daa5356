"""A differentiable optimizer's state in and out, in torch's per-parameter format: built from
a torch optimizer, `state_dict`/`load_state_dict`, `copy_state_to` and `sync_hyperparameters`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._errors import OptimError
from ._options import apply_override, validated_options
from ._rules_adam_variants import scalar_dtype
from ._shell import StateShell
from ._state import GroupState


def copy_state_value(value: Any, device: torch.device | str | None) -> Any:
    """A state value as the optimizer keeps it: a tensor cloned and detached (on `device`)."""
    if isinstance(value, torch.Tensor):
        copied = value.detach().clone()
        return copied if device is None else copied.to(device)
    return value


def import_groups(
    opt: StateShell,
    other: torch.optim.Optimizer,
    reference: list[torch.Tensor],
    device: torch.device | str | None,
) -> None:
    """Set `opt`'s param groups, slot layout and state from torch optimizer `other`, whose
    parameters are among `reference` (each once)."""
    position = {id(p): i for i, p in enumerate(reference)}
    seen: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(other.param_groups):
        mapping: list[int] = []
        for j, p in enumerate(group["params"]):
            if id(p) not in position:
                raise OptimError(
                    f"parameter {j} of param group {g} of the {type(other).__name__} "
                    f"(shape {tuple(p.shape)}) is not among reference_params; pass the "
                    "parameters the optimizer was built on (e.g. model.parameters())"
                )
            if id(p) in seen:  # torch steps it twice (and warns that this will be an error)
                raise OptimError(
                    f"parameter {j} of param group {g} of the {type(other).__name__} is the "
                    f"same tensor as parameter {seen[id(p)][1]} of group {seen[id(p)][0]}: "
                    "give each parameter to the optimizer once"
                )
            seen[id(p)] = (g, j)
            mapping.append(position[id(p)])
        copied = {k: v for k, v in group.items() if k != "params"}
        copied["params"] = [reference[i] for i in mapping]
        opt.param_groups.append(copied)
        opt._group_to_param_list.append(mapping)
        group_state = GroupState()
        for j, p in enumerate(group["params"]):
            torch_state = other.state.get(p)
            if torch_state:
                group_state[j] = opt._import_state(torch_state, device)
        opt.state.append(group_state)


def state_dict(opt: StateShell) -> dict[str, Any]:
    """`opt.state_dict()`: torch's format, parameters numbered across the groups."""
    states: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for group, group_state in zip(opt.param_groups, opt.state, strict=True):
        numbers = list(range(index, index + len(group["params"])))
        for j, number in enumerate(numbers):
            slot = group_state.get(j)
            if slot:
                states[number] = {
                    k: _as_torch_value(v, None, _device_of(v)) for k, v in slot.items()
                }
        options = {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in group.items()
            if k != "params"
        }
        groups.append({**options, "params": numbers})
        index += len(numbers)
    return {"state": states, "param_groups": groups}


def load_state_dict(opt: StateShell, saved_dict: Mapping[str, Any]) -> None:
    """`opt.load_state_dict(saved_dict)`: everything checked before anything is set."""
    groups = saved_dict.get("param_groups")
    sizes = [len(g["params"]) for g in opt.param_groups]
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != sizes:
        raise OptimError(
            f"state_dict has param groups of sizes "
            f"{[len(g.get('params', ())) for g in groups or []]}; expected {sizes}"
        )
    saved = saved_dict.get("state", {})
    options = {k: [g[k] for g in groups] for k in groups[0] if k != "params"}
    known = set().union(*(g.keys() for g in opt.param_groups)) - {"params"}
    new_options = validated_options(opt, {k: v for k, v in options.items() if k in known})
    new_state = []
    for group in groups:
        group_state = GroupState()
        for j, number in enumerate(group["params"]):
            if saved.get(number):
                group_state[j] = opt._import_state(saved[number], opt._device)
        new_state.append(group_state)
    for group, opts in zip(opt.param_groups, new_options, strict=True):
        group.update((k, v) for k, v in opts.items() if k != "params")
    opt.state = new_state


def _torch_pairs(
    opt: StateShell, other: torch.optim.Optimizer
) -> list[tuple[int, int, torch.Tensor]]:
    if len(other.param_groups) != len(opt.param_groups) or any(
        len(a["params"]) != len(b["params"])
        for a, b in zip(other.param_groups, opt.param_groups, strict=True)
    ):
        raise OptimError(
            f"the {type(other).__name__} has param groups of sizes "
            f"{[len(g['params']) for g in other.param_groups]}; expected "
            f"{[len(g['params']) for g in opt.param_groups]} as in {type(opt).__name__}"
        )
    return [
        (g, j, p)
        for g, group in enumerate(other.param_groups)
        for j, p in enumerate(group["params"])
    ]


def copy_state_to(opt: StateShell, other: torch.optim.Optimizer, copy_params: bool) -> None:
    """`opt.copy_state_to(other, copy_params)`: each value in the type torch keeps it in."""
    templates: dict[tuple[Any, ...], dict[str, Any]] = {}
    for g, j, p in _torch_pairs(opt, other):
        ours = opt.state[g].get(j)
        if ours:
            key = (g, p.shape, p.dtype, p.device)
            if key not in templates:
                templates[key] = _torch_state_template(other, other.param_groups[g], p)
            previous = other.state.get(p) or templates[key]
            other.state[p] = {
                name: _as_torch_value(value, previous.get(name), p.device)
                for name, value in ours.items()
            }
        if copy_params:
            with torch.no_grad():
                p.copy_(opt.param_groups[g]["params"][j])


def sync_hyperparameters(
    opt: StateShell, other: torch.optim.Optimizer, names: Sequence[str]
) -> None:
    """`opt.sync_hyperparameters(other, names)`: as an override of `other`'s values."""
    _torch_pairs(opt, other)
    for name in names:
        apply_override(opt, {name: [group[name] for group in other.param_groups]})


def _torch_state_template(
    opt: torch.optim.Optimizer, group: Mapping[str, Any], p: torch.Tensor
) -> dict[str, Any]:
    """The state torch itself keeps for a parameter like `p` under `group`'s options: one step
    of a fresh optimizer of `opt`'s type on a stand-in (its values are not used, its types are).
    Empty where that optimizer cannot be built so (a plugin with another signature)."""
    options = {k: v for k, v in group.items() if k in opt.defaults}
    stand_in = torch.zeros_like(p, requires_grad=True)
    try:
        fresh = type(opt)([stand_in], **options)
        stand_in.grad = torch.zeros_like(p)
        with torch.no_grad():
            fresh.step()
    except Exception:
        return {}
    return dict(fresh.state.get(stand_in, {}))


def _as_torch_value(value: Any, like: Any, device: torch.device) -> Any:
    """`value` (detached) in the type torch keeps `like` in; a tensor on `device` otherwise."""
    if isinstance(like, torch.Tensor):
        if isinstance(value, torch.Tensor):
            return value.detach().to(dtype=like.dtype, device=like.device, copy=True)
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if isinstance(value, torch.Tensor):
        return value.detach().clone().to(device)
    if isinstance(value, int) and like is None:  # a step count torch has not shown a type for
        return torch.tensor(float(value), dtype=scalar_dtype())
    return value


def _device_of(value: Any) -> torch.device:
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
