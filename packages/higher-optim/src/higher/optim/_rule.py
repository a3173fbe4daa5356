"""`Rule`: an update rule written once as pure functions, shared by the class and functional API."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._errors import HyperparameterTypeError

#: A param group's options as a rule reads them: option name -> value.
Hyper = Mapping[str, Any]
InitFn = Callable[[Sequence[torch.Tensor], Hyper], Any]
UpdateFn = Callable[
    [Sequence[torch.Tensor], Sequence[torch.Tensor], Any, Hyper], tuple[list[torch.Tensor], Any]
]

#: Options that change how torch computes a step, never what it computes: accepted, not needed.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})
#: Keys torch keeps in param groups that are no option of the optimizer, so a twin passes them
#: by: `param_names` (an optimizer built on named parameters) and what learning-rate schedulers
#: add for their own bookkeeping (`initial_lr` by every scheduler, the learning-rate and
#: momentum bounds by `OneCycleLR`, `swa_lr` by `SWALR`). Any other key a twin does not honour
#: is refused.
BOOKKEEPING_KEYS = frozenset(
    {"param_names", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"}
)


class Rule(NamedTuple):
    """An update rule as pure functions over lists of tensors, with what it accepts.

    `init(params, hyper) -> state` and `update(params, grads, state, hyper) -> (params, state)`
    never modify their inputs; `state` is the rule's typed `NamedTuple` (`step` an int shared by
    the list, fields named as in the torch optimizer's state). `hyper` maps option names to
    values: a number or tensor for each of `hypers`, a pair of them for `pairs`, a bool for
    `flags` (whose defaults serve a torch that lacks the option).

    A twin is a `RuleOptimizer` subclass with a `rule`; the built-in ones are reachable as
    `DifferentiableX.rule`.

    Examples:
        >>> import torch, higher.optim
        >>> rule = higher.optim.DifferentiableSGD.rule
        >>> w = torch.ones(2)
        >>> hyper = {"lr": 0.5, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0}
        >>> new, state = rule.update([w], [w], rule.init([w], hyper), hyper)
        >>> new[0].tolist()
        [0.5, 0.5]
    """

    name: str
    state_type: type[Any]
    init: InitFn
    update: UpdateFn
    hypers: tuple[str, ...]
    pairs: tuple[str, ...] = ()
    flags: Mapping[str, bool] = {}
    #: 0-d tensors of the state shared by the whole list (e.g. NAdam's `mu_product`).
    scalar_state: tuple[str, ...] = ()
    #: Options torch keeps in a group that the rule reads only in a documented special way.
    extra: tuple[str, ...] = ()
    #: Whether `lr` may be a list of tensors, one per parameter (Meta-SGD).
    per_param_lr: bool = True
    #: Whether sparse gradients are taken (made dense first: torch's sparse path computes the
    #: same), as torch.optim's SGD and Adagrad take them; other rules refuse them as torch does.
    sparse: bool = False
    #: Options (of `hypers` and `pairs`) the update uses only elementwise, so that in a param
    #: group each may be a tensor of many values that broadcasts to every parameter of the group
    #: (per-element hyperparameters, as 0.2.1 ran them); the others take one value each.
    per_element: tuple[str, ...] = ("lr",)
    #: The rule's own check of a param group's options, beside the checks of `hypers`, `pairs`
    #: and `flags` (an option of `extra`, such as a learned optimizer's weight tensor):
    #: `check(hyper, params)` with the group's options and its parameters (none for the
    #: functional API), raising `HyperparameterTypeError` that says what was wrong. Run when
    #: a twin is made, and for every `override`, before any step.
    check: Callable[[Hyper, Sequence[torch.Tensor]], None] | None = None

    @property
    def options(self) -> frozenset[str]:
        """Every option name this rule accepts in a param group."""
        return frozenset((*self.hypers, *self.pairs, *self.flags, *self.extra)) | (
            IMPLEMENTATION_FLAGS
        )


def check_scalar(name: str, value: object, *, per_param: int | None = None) -> None:
    """Raise `HyperparameterTypeError` unless `value` is a number or a tensor (or, with
    `per_param=n` for the learning rate, a list of `n` tensors: one per parameter)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    if (
        per_param is not None
        and isinstance(value, (list, tuple))
        and len(value) == per_param
        and all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in value)
    ):
        return
    expected = "a number or a floating-point tensor"
    if per_param is not None:
        expected += f", or a list of {per_param} tensors (one per parameter of the group)"
    raise HyperparameterTypeError(
        f"hyperparameter {name!r} must be {expected}, got {type(value).__name__}: {value!r}"
    )


def check_pair(name: str, value: object) -> None:
    """Raise `HyperparameterTypeError` unless `value` is a pair of numbers or tensors."""
    if isinstance(value, torch.Tensor) and value.shape == (2,) and value.is_floating_point():
        return
    if isinstance(value, (list, tuple)) and len(value) == 2:
        for item in value:
            check_scalar(name, item)
        return
    raise HyperparameterTypeError(
        f"hyperparameter {name!r} must be a pair of numbers or tensors, got {value!r}"
    )


def check_flag(name: str, value: object) -> None:
    """Raise `HyperparameterTypeError` unless `value` is a bool."""
    if not isinstance(value, bool):
        raise HyperparameterTypeError(
            f"option {name!r} must be a bool, got {type(value).__name__}: {value!r}"
        )


def check_hyper(rule: Rule, hyper: Hyper, params: Sequence[torch.Tensor] | None = None) -> None:
    """Check every option of `hyper` that `rule` reads has a value of the right type and, for
    tensors, shape: one value, or with `params` (the parameters of a param group) a tensor that
    broadcasts to each of them without changing its shape, for the options of
    `rule.per_element`; a per-parameter `lr` is a list of tensors shaped like its parameter.
    Then the rule's own `check`, if it has one."""
    for name in rule.hypers:
        if name not in hyper:
            continue
        value = hyper[name]
        per_param = (
            len(params) if params is not None and name == "lr" and rule.per_param_lr else None
        )
        check_scalar(name, value, per_param=per_param)
        if isinstance(value, (list, tuple)):
            if params is not None:
                for i, (v, p) in enumerate(zip(value, params, strict=True)):
                    if not _broadcasts_to(v.shape, p.shape):
                        raise HyperparameterTypeError(
                            f"hyperparameter {name!r}[{i}] has shape {tuple(v.shape)}; it must "
                            f"broadcast to parameter {i}'s shape {tuple(p.shape)}"
                        )
        else:
            check_values(rule, name, value, params, per_param is not None)
    for name in rule.pairs:
        if name in hyper:
            check_pair(name, hyper[name])
            if not isinstance(hyper[name], torch.Tensor):
                for item in hyper[name]:
                    check_values(rule, name, item, params, False)
    for name in rule.flags:
        if name in hyper:
            check_flag(name, hyper[name])
    if rule.check is not None:
        rule.check(hyper, () if params is None else params)


def check_values(
    rule: Rule,
    name: str,
    value: object,
    params: Sequence[torch.Tensor] | None,
    per_param: bool,
) -> None:
    """Refuse a tensor for option `name` that would change the shape of one of `params` (the
    parameters of its param group), or that holds many values where `rule` takes one or where
    the parameters are not known."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return
    shape = tuple(value.shape)
    lists = ", or a list of tensors, one per parameter" if per_param else ""
    if value.numel() != 1 and (params is None or name not in rule.per_element):
        why = (
            f"{rule.name} takes one value for {name!r} (its update does not use it elementwise)"
            if params is not None
            else "one value per element is taken in a param group, whose parameters it must "
            "broadcast to"
        )
        raise HyperparameterTypeError(
            f"hyperparameter {name!r} is a tensor of shape {shape}; expected one value (a 0-d "
            f"tensor){lists}: {why}"
        )
    for i, p in enumerate(params or ()):
        if not _broadcasts_to(value.shape, p.shape):
            raise HyperparameterTypeError(
                f"hyperparameter {name!r} is a tensor of shape {shape}, which does not "
                f"broadcast to the shape {tuple(p.shape)} of parameter {i} of the group without "
                "changing it; expected one value (a 0-d tensor), one value per element (a tensor "
                f"that broadcasts to every parameter of the group, keeping its shape){lists}"
            )
        if p.is_complex() and value.numel() != 1:
            raise HyperparameterTypeError(
                f"hyperparameter {name!r} is a tensor of shape {shape} (one value per element) "
                f"and parameter {i} of the group is complex; expected one value (a 0-d "
                f"tensor){lists}: per-element values are taken for real parameters"
            )


def unfusable_options(rule: Rule, hyper: Hyper) -> list[str]:
    """The options of `hyper` (in a pair too; not a per-parameter `lr` list) whose tensor cannot
    be applied to the concatenation of a group's parameters: one value per element, or one
    value with more than one dimension."""
    found = []
    for name in (*rule.hypers, *rule.pairs):
        value = hyper.get(name)
        if isinstance(value, torch.Tensor):  # numbers, the common case, are passed over
            items: Sequence[Any] = (value,)
        elif name in rule.pairs and isinstance(value, (list, tuple)):
            items = value
        else:
            continue
        if any(isinstance(v, torch.Tensor) and (v.numel() != 1 or v.dim() > 1) for v in items):
            found.append(name)
    return found


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return bool(torch.broadcast_shapes(shape, target) == target)
    except RuntimeError:
        return False


def flag(rule: Rule, hyper: Hyper, name: str) -> bool:
    """The value of a bool option, or the rule's default where this torch lacks the option.

    Examples:
        >>> from higher.optim import DifferentiableSGD
        >>> from higher.optim.rule import flag
        >>> flag(DifferentiableSGD.rule, {"lr": 0.1}, "nesterov")
        False
    """
    return bool(hyper.get(name, rule.flags[name]))


def split_lr(hyper: Hyper) -> tuple[Any, list[torch.Tensor] | None]:
    """(`lr` when one value serves all params, per-parameter list of learning rates or None).

    Examples:
        >>> import torch
        >>> from higher.optim.rule import split_lr
        >>> split_lr({"lr": 0.1}), split_lr({"lr": [torch.ones(1)]})[0]
        ((0.1, None), None)
    """
    lr = hyper["lr"]
    if isinstance(lr, (list, tuple)):
        return None, list(lr)
    return lr, None
