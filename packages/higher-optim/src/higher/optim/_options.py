"""A differentiable optimizer's options: an `override` checked against its param groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._errors import HyperparameterTypeError, OptimError
from ._shell import OptionsShell


def validated_options(
    opt: OptionsShell, override: Mapping[str, Sequence[Any]]
) -> list[dict[str, Any]]:
    """The param groups' options with `override` applied, every value checked; nothing is
    changed (a rejected override leaves the optimizer as it was)."""
    if not isinstance(override, Mapping):
        raise HyperparameterTypeError(
            f"override must be a dict of hyperparameter -> list of values, got {override!r}"
        )
    n_groups = len(opt.param_groups)
    known = set().union(*(g.keys() for g in opt.param_groups)) - {"params"}
    options = [dict(group) for group in opt.param_groups]
    for name, values in override.items():
        if name not in known:
            raise OptimError(
                f"override key {name!r} is not a hyperparameter of "
                f"{type(opt).__name__}; expected one of {sorted(known)}"
            )
        if not isinstance(values, (list, tuple)):
            raise HyperparameterTypeError(
                f"override[{name!r}] must be a list of values (one for all groups or one "
                f"per group), got {type(values).__name__}"
            )
        if len(values) not in (1, n_groups):
            raise OptimError(_count_message(opt, name, values, n_groups))
        for g, group in enumerate(options):
            group[name] = values[0] if len(values) == 1 else values[g]
    opt._check_groups(options)
    return options


def _count_message(opt: OptionsShell, name: str, values: Sequence[Any], n_groups: int) -> str:
    """Why `override[name]`, a list of `len(values)` values, does not fit the groups."""
    if n_groups > 1:
        return (
            f"override[{name!r}] has {len(values)} values; expected 1 (all groups) or "
            f"{n_groups} (one per param group)"
        )
    message = (
        f"override[{name!r}] has {len(values)} values; expected 1, the value for the "
        "optimizer's single param group"
    )
    n = len(opt.param_groups[0]["params"])
    per_param = getattr(getattr(opt, "rule", None), "per_param_lr", True)
    if name == "lr" and per_param and len(values) == n:  # perhaps one rate per parameter
        rates = ", ".join(f"lr_{i}" for i in range(n)) if n <= 3 else f"lr_0, ..., lr_{n - 1}"
        message += (
            f"; for one learning rate per parameter, put them in one list: override={{'lr': "
            f"[[{rates}]]}} (one tensor per parameter: 0-d, or shaped like its parameter "
            "for one rate per element)"
        )
    return message


def apply_override(opt: OptionsShell, override: Mapping[str, Sequence[Any]]) -> None:
    """Check `override`, then set it in the param groups (it persists)."""
    for group, options in zip(opt.param_groups, validated_options(opt, override), strict=True):
        group.update((k, v) for k, v in options.items() if k != "params")
